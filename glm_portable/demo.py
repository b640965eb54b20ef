"""``glm-portable demo``: the whole pipeline on a tiny model in about a minute on a laptop CPU.

Builds a tiny ChatGLM3 model, writes an ADGEN-style dataset whose answers follow from the
attributes, preprocesses it, evaluates the untrained model on held-out rows, fine-tunes, evaluates
again, and reports. On a GPU or NPU the same steps run there.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from typing import TYPE_CHECKING, Literal

from glm_portable.errors import UserError
from glm_portable.modeling.options import TinyFamily
from glm_portable.schema import DEVICE_HELP, option, validate

if TYPE_CHECKING:  # the pipeline's modules are imported when it runs, so that `--help` stays fast
    from glm_portable.backends import Selection

TRAIN_ROWS, EVAL_ROWS = 600, 40
MARKER = ".glm-portable-demo"
# The tiny base is random: a prefix has little to steer, so each method gets a rate that moves it.
DEMO_LR = {"lora": 1e-2, "ptuning": 3e-1}
LORA_TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]


@dataclass
class DemoOptions:
    output: Path = option(Path("glm-portable-demo"), "Directory for everything the demo makes (an earlier demo "
                          "there is replaced).")
    method: Literal["lora", "ptuning"] = option("lora", "The fine-tuning method.")
    family: TinyFamily = option("chatglm3", "ChatGLM-6B, ChatGLM2 or ChatGLM3 tiny model.")
    device: Optional[str] = option(None, DEVICE_HELP)
    steps: int = option(200, "Training steps.", minimum=1)


@dataclass
class DemoReport:
    device: str
    reason: str
    method: str
    steps: int
    losses: list[tuple[int, float]]
    before: dict[str, Any]
    after: dict[str, Any]
    seconds: float
    output: Path


def run_demo(options: DemoOptions, selection: "Selection", stage: Optional[Callable[[str], None]] = None) -> DemoReport:
    """Run the demo in ``options.output``, replacing an earlier demo there but never any other directory.

    Family chatglm runs it on a ChatGLM-6B (first generation) tiny model, chatglm2/3 on theirs.
    """
    from glm_portable.data import PreprocessOptions, preprocess
    from glm_portable.data.synthetic import adgen_rows
    from glm_portable.evaluation import METRIC_KEYS, EvalOptions, evaluate
    from glm_portable.jsonfile import write_json_object
    from glm_portable.modeling.tiny import make_tiny_model
    from glm_portable.training.options import TrainOptions
    from glm_portable.training.run_dir import read_metrics
    from glm_portable.training.trainer import run_training

    validate(options)
    output, method, family, steps = Path(options.output), options.method, options.family, options.steps
    if output.exists() and any(output.iterdir()):
        if not (output / MARKER).is_file():
            raise UserError(f"{output}: exists and was not made by `glm-portable demo`; choose another --output")
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)
    (output / MARKER).write_text("made by glm-portable demo; the next demo run here replaces this directory\n")
    say = stage or (lambda _: None)
    started = time.perf_counter()
    backend = selection.backend
    backend.prepare_process()

    say(f"building a tiny {family} model")
    model = make_tiny_model(output / "model", family=family, hidden_size=128, layers=2, heads=4)
    say("writing the ADGEN-style dataset")
    rows = adgen_rows(TRAIN_ROWS + EVAL_ROWS, seed=0)
    for name, part in (("train.json", rows[:TRAIN_ROWS]), ("dev.json", rows[TRAIN_ROWS:])):
        (output / name).write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in part) + "\n", encoding="utf-8")
    say("preprocessing")
    preprocess(PreprocessOptions(model=model, train_file=output / "train.json", eval_file=output / "dev.json",
                                 out=output / "data", max_target_length=64))
    say("evaluating the untrained model")
    before = evaluate(EvalOptions(model=model, data=output / "data", output=output / "eval-before", max_new_tokens=40), backend)
    say(f"training ({method}, {steps} steps)")
    options = TrainOptions(model=model, data=output / "data", output=output / "run", method=method, lr=DEMO_LR[method],
                           pre_seq_len=16, lora_rank=16, lora_alpha=32, lora_dropout=0.0, lora_target=LORA_TARGETS,
                           batch_size=16, grad_accum=1, max_steps=steps, logging_steps=max(1, steps // 10),
                           save_steps=steps)
    run_training(options, backend, selection.reason)
    say("evaluating the fine-tuned model")
    after = evaluate(EvalOptions(model=model, data=output / "data", output=output / "eval-after",
                                 checkpoint=output / "run", max_new_tokens=40), backend)
    report = DemoReport(backend.name, selection.reason, method, steps,
                        [(m["step"], m["loss"]) for m in read_metrics(output / "run")], before, after,
                        time.perf_counter() - started, output)
    write_json_object(output / "demo.json", {
        "device": report.device, "family": family, "method": method, "steps": steps, "losses": report.losses, "seconds": round(report.seconds, 1),
        "before": {k: before[k] for k in METRIC_KEYS}, "after": {k: after[k] for k in METRIC_KEYS},
    })
    return report
