"""Packed training batches: every row once, positions restart, each row's loss and gradient as if alone."""

import dataclasses
import json
import random
import subprocess
import sys

import pytest
import torch

from glm_portable.backends.kernels import PORTABLE_KERNELS, reference_varlen_attention
from glm_portable.data import PreprocessOptions, preprocess
from glm_portable.data.packing import PackedCollator, pack_rows, padding_fraction
from glm_portable.modeling import load_model, load_tokenizer
from glm_portable.modeling.model import IGNORE_INDEX, causal_lm_loss


def test_best_fit_packs_every_row_once_with_restarting_positions():
    rng = random.Random(0)
    rows = [[rng.randrange(5, 900) for _ in range(rng.randrange(3, 30))] for _ in range(200)]
    labels = [[-100] * 2 + row[2:] for row in rows]
    packed = pack_rows(rows, labels, 40)
    assert all(len(pack) <= 40 for pack in packed["input_ids"])
    seen = []
    for ids, lab, positions in zip(packed["input_ids"], packed["labels"], packed["position_ids"]):
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(ids)]
        assert positions == [p for a, b in zip(starts, starts[1:]) for p in range(b - a)]
        seen += [(tuple(ids[a:b]), tuple(lab[a:b])) for a, b in zip(starts, starts[1:])]
    assert sorted(seen) == sorted(zip(map(tuple, rows), map(tuple, labels)))
    lengths = [len(r) for r in rows]
    assert padding_fraction([len(p) for p in packed["input_ids"]], 40) < 0.05 < padding_fraction(lengths, 40)
    with pytest.raises(ValueError, match="41 tokens does not fit"):
        pack_rows([[1] * 41], [[1] * 41], 40)


def test_the_collator_bounds_rows_and_makes_the_tail_one_unlabelled_block():
    batch = PackedCollator(pad_token_id=0, length=8)([
        {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, 6, 7, -100, 9], "position_ids": [0, 1, 2, 0, 1]},
        {"input_ids": [1, 2, 3, 4, 5, 6, 7, 8], "labels": [-100] + [2] * 7, "position_ids": [0, 1, 2, 3, 4, 0, 1, 2]}])
    assert batch["cu_seqlens"].tolist() == [0, 3, 5, 8, 13, 16] and batch["cu_seqlens"].dtype == torch.int32
    assert batch["position_ids"].tolist()[0] == [0, 1, 2, 0, 1, 0, 0, 0]
    assert batch["labels"].tolist()[0] == [-100, 6, 7, -100, 9, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    assert batch["input_ids"].tolist()[0] == [5, 6, 7, 8, 9, 0, 0, 0]


def _counting(kernels, calls):
    if kernels.packed_attention is None:
        return kernels

    def packed_attention(*args):
        calls.append(args[3])
        return kernels.packed_attention(*args)

    return dataclasses.replace(kernels, packed_attention=packed_attention)


VARLEN_REFERENCE = dataclasses.replace(PORTABLE_KERNELS, packed_attention=reference_varlen_attention)


@pytest.mark.parametrize("kernels", [PORTABLE_KERNELS, VARLEN_REFERENCE], ids=["block-mask", "varlen"])
@pytest.mark.parametrize("pre_seq_len", [None, 3])
def test_each_packed_row_has_the_loss_and_gradient_it_has_alone(tiny2_dir, pre_seq_len, kernels):
    tokenizer = load_tokenizer(tiny2_dir)
    texts = ["类型#裙*颜色#红色 这条裙子", "Hello, how are you today?", "问：水在多少度会结冰？答：零度", "你好"]
    rows = [tokenizer.encode(t) for t in texts]
    labels = [[IGNORE_INDEX] * 3 + row[3:] for row in rows]
    packed = pack_rows(rows, labels, 20)  # three sequences, two rows in one, padding tails
    batch = PackedCollator(tokenizer.pad_token_id, 20)([{k: packed[k][i] for k in packed}
                                                        for i in range(len(packed["input_ids"]))])
    assert batch["input_ids"].shape[0] == 3
    model = load_model(tiny2_dir, dtype="float32", device="cpu", pre_seq_len=pre_seq_len)
    calls = []
    model.set_kernels(_counting(kernels, calls))
    alone_losses, alone_grads = [], []
    for row, label in zip(rows, labels):
        model.zero_grad()
        out = model(input_ids=torch.tensor([row]))
        loss = causal_lm_loss(out.logits, torch.tensor([label]))
        if pre_seq_len:
            loss.backward()
            alone_grads.append(model.transformer.prefix_encoder.embedding.weight.grad.clone() * (len(row) - 3))
        alone_losses.append(loss.detach() * (len(row) - 3))  # the sum over its labelled tokens
    model.zero_grad()
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], cu_seqlens=batch["cu_seqlens"])
    logits = out.logits.float()
    per_token = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:],
                                                  ignore_index=IGNORE_INDEX, reduction="none")
    total = per_token.sum()
    torch.testing.assert_close(total.detach(), torch.stack(alone_losses).sum(), rtol=1e-5, atol=1e-5)
    checked = 0
    for seq in range(batch["input_ids"].shape[0]):
        starts = (batch["position_ids"][seq] == 0).nonzero().flatten().tolist() + [batch["input_ids"].shape[1]]
        for start, end in zip(starts, starts[1:]):
            row = batch["input_ids"][seq, start:end].tolist()
            if row in rows:  # each real row's own loss, not only the sum
                torch.testing.assert_close(per_token[seq, start:end - 1].sum().detach(), alone_losses[rows.index(row)],
                                           rtol=1e-5, atol=1e-5)
                checked += 1
    assert checked == len(rows)
    assert len(calls) == (model.config.num_layers if kernels.packed_attention is not None else 0)
    if pre_seq_len:
        total.backward()
        torch.testing.assert_close(model.transformer.prefix_encoder.embedding.weight.grad,
                                   torch.stack(alone_grads).sum(0), rtol=1e-4, atol=1e-6)


def _train(args):
    return subprocess.run([sys.executable, "-m", "glm_portable.cli", "train", *map(str, args)],
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def data_dir(tiny_dir, tmp_path_factory):
    """Rows of different lengths, all much shorter than a packed sequence (64 + 128 tokens)."""
    root = tmp_path_factory.mktemp("packing-data")
    colors = ["红色", "白色", "黑色", "蓝色", "绿色", "粉色", "灰色", "紫色"]
    rows = [{"content": f"类型#裙*颜色#{c}" + "*风格#简约" * (i % 3), "summary": f"这条{c}的裙子" + "简约大方。" * (i % 4 + 1)}
            for i, c in enumerate(colors * 4)]
    (root / "train.json").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    preprocess(PreprocessOptions(model=tiny_dir, train_file=root / "train.json", out=root / "data"))
    return root / "data"


def test_packed_training_learns_and_records_how_it_batched(tiny_dir, data_dir, tmp_path):
    common = ["--model", tiny_dir, "--data", data_dir, "--pre-seq-len", "4", "--lr", "0.3", "--batch-size", "2",
              "--grad-accum", "1", "--max-steps", "30", "--logging-steps", "1", "--save-steps", "30"]
    out = _train([*common, "--output", tmp_path / "packed", "--packing"])
    assert out.returncode == 0, out.stderr
    run = json.loads((tmp_path / "packed" / "run.json").read_text())
    assert run["padding"] == "packed" and run["identity"]["packing"] is True
    assert run["data"]["rows"] == 32 and run["data"]["packed_sequences"] < 32
    losses = [json.loads(line)["loss"] for line in (tmp_path / "packed" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3
    results = json.loads((tmp_path / "packed" / "train_results.json").read_text())
    assert results["train_samples"] == 32 and results["train_rows_per_second"] > results["train_samples_per_second"]
    refused = _train([*common, "--output", tmp_path / "packed", "--resume", "auto"])
    assert refused.returncode == 2 and "packing" in refused.stderr


def test_packing_refusals_exit_2(tiny_dir, data_dir, tmp_path):
    common = ["--model", tiny_dir, "--data", data_dir, "--output", tmp_path / "x", "--max-steps", "1"]
    remote = _train([*common, "--packing", "--impl", "remote"])
    assert remote.returncode == 2 and "cannot keep attention inside each packed row" in remote.stderr
    both = _train([*common, "--packing", "--group-by-length"])
    assert both.returncode == 2 and "choose one" in both.stderr


def test_chatglm_6b_is_not_packed(tmp_path):
    from glm_portable.modeling.tiny import make_tiny_model

    v1 = make_tiny_model(tmp_path / "v1", family="chatglm", seed=3)
    (tmp_path / "rows.json").write_text(json.dumps({"content": "类型#裙", "summary": "简约"}, ensure_ascii=False))
    preprocess(PreprocessOptions(model=v1, train_file=tmp_path / "rows.json", out=tmp_path / "data"))
    out = _train(["--model", v1, "--data", tmp_path / "data", "--output", tmp_path / "run", "--packing"])
    assert out.returncode == 2 and "ChatGLM-6B's 2-D positions" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "run" / "run.json").exists()


def test_the_batch_counter_counts_rows_tokens_and_positions_when_a_step_consumes_them():
    from glm_portable.training.trainer import BatchCounter

    counter = BatchCounter(PackedCollator(pad_token_id=0, length=8))
    pack = {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, 6, 7, -100, 9], "position_ids": [0, 1, 2, 0, 1]}
    counter([pack, pack])
    counter([pack])  # fetched ahead by the data loader: not consumed yet
    counter.consume(1)
    assert (counter.rows, counter.tokens, counter.positions) == (4, 10, 16)
    counter.consume(5)  # the last step takes what is left, no more
    assert (counter.rows, counter.tokens, counter.positions) == (6, 15, 24)


@pytest.mark.parametrize("kernels", [PORTABLE_KERNELS, VARLEN_REFERENCE], ids=["block-mask", "varlen"])
def test_a_compiled_packed_step_gives_the_eager_loss_and_gradient(tiny2_dir, kernels):
    """The rows' index, mask and host lengths are built inside the compiled forward (``--packing --compile``)."""
    model = load_model(tiny2_dir, dtype="float32", device="cpu", pre_seq_len=3)
    model.set_kernels(kernels)
    model.train()
    model.transformer.prefix_dropout.p = 0.0
    packs = [{"input_ids": list(range(5, 15)) + list(range(20, 26)), "labels": list(range(5, 15)) + [-100] * 6,
              "position_ids": list(range(10)) + list(range(6))}, {"input_ids": list(range(30, 42)),
              "labels": [-100] * 4 + list(range(34, 42)), "position_ids": list(range(12))}]
    batch = PackedCollator(0, 16)(packs)
    results = []
    for step in (model, torch.compile(model)):
        model.zero_grad()
        loss = step(**batch).loss
        loss.backward()
        results.append((loss.detach(), model.transformer.prefix_encoder.embedding.weight.grad.clone()))
    torch.testing.assert_close(results[1], results[0])
