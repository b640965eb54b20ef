"""Device-specific code lives in backends/ only (docs/architecture.md, "The device seam"): no device module,
no device literal, and in the core no comparison with a backend's name, which a capability question replaces."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("glm_portable", "patches", "scripts", "tests")
# Reviewed exceptions: the torch_npu double implements torch.npu, and this file spells the patterns.
ALLOWED = {"tests/fakes/torch_npu/__init__.py", "tests/test_device_literals.py"}

PATTERNS = {
    "torch.cuda": re.compile(r"\btorch\.cuda\b"),
    "torch.npu": re.compile(r"\btorch\.npu\b"),
    ".cuda()": re.compile(r"\.cuda\("),
    ".npu()": re.compile(r"\.npu\("),
    "device literal": re.compile(
        r"""(torch\.device\(|\bdevice\s*=\s*|\bdevice_type\s*=\s*|\.to\()\s*["'](cuda|npu)(:\d+)?["']"""
    ),
}
NAME_COMPARISON = re.compile(r"""[!=]=\s*["'](cpu|cuda|npu)["']|["'](cpu|cuda|npu)["']\s*[!=]=""")
CORE = ("glm_portable", "scripts")  # tests assert which backend was chosen; patches decide by the Context's backend


def find_violations(root: Path) -> list[str]:
    found = []
    for folder in SCANNED:
        for path in sorted((root / folder).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            if rel in ALLOWED:
                continue
            for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                for label, pattern in PATTERNS.items():
                    if pattern.search(line):
                        found.append(f"{rel}:{lineno}: {label}: {line.strip()}")
                if folder in CORE and NAME_COMPARISON.search(line):
                    found.append(f"{rel}:{lineno}: backend-name comparison: {line.strip()}")
    return found


def test_no_device_specific_code_outside_backends():
    assert find_violations(ROOT) == []


def test_the_check_catches_each_pattern(tmp_path):
    bad = tmp_path / "glm_portable" / "bad.py"
    bad.parent.mkdir()
    bad.write_text(
        "x = torch.cuda.is_available()\ny = torch.npu.device_count()\nm.cuda()\nm.npu()\n"
        "t.to('cuda:0')\nd = torch.device(\"npu\")\nf(device='cuda')\nif backend.name != \"cpu\": pass\n"
        "padding = 'fixed' if 'npu' == name else 'dynamic'\n"
    )
    assert len(find_violations(tmp_path)) == 9
