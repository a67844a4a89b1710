"""Gate training by self-distillation on tiny random-weight Qwen3 models (CPU).

The model is the issue's tiny Qwen3 (hidden 128, 2 layers, 4/2 heads, head dim 64) with
block size 16 and gate dim 64; rows are a few hundred tokens, so the file runs in well
under two minutes on one CPU thread.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from seerattn_r import ops
from seerattn_r.gate import build_gates
from seerattn_r.training.cli import load_gate_modules
from seerattn_r.training.data import ByteTokenizer, PackedDataset, load_documents, split_documents, tokenize
from seerattn_r.training.evaluate import evaluate_gates
from seerattn_r.training.loss import sequence_gate_logits
from seerattn_r.training.models import random_qwen3
from seerattn_r.training.teacher import teacher_attention
from seerattn_r.training.trainer import GateTrainer, TrainConfig
from tests.utils import assert_close

BS, DG, SEQ = 16, 64, 256


@pytest.fixture(autouse=True)
def one_thread():
    # Two threads on a shared 2-core machine run these small matmuls ~10x slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_docs(n: int, seed: int, lo: int = 40, hi: int = 400) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=int(k)).astype(np.int32) for k in rng.integers(lo, hi, size=n)]


def make_trainer(model, docs, **overrides) -> GateTrainer:
    settings = dict(block_size=BS, gate_dim=DG, steps=50, seq_len=SEQ, grad_accum=1, warmup_steps=5)
    settings.update(overrides)
    torch.manual_seed(0)
    return GateTrainer(model, build_gates(model.config, DG), PackedDataset(docs, SEQ, 0), TrainConfig(**settings))


# -- data ---------------------------------------------------------------------------------

def test_load_documents(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    assert load_documents(tmp_path / "a.txt") == ["hello world"]
    lines = [{"text": "plain"}, {"messages": [{"role": "user", "content": "2+2?"},
                                              {"role": "assistant", "content": "<think>4</think>4"}]}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    docs = load_documents(tmp_path / "b.jsonl")
    assert docs[0] == "plain" and docs[1][1]["content"] == "<think>4</think>4"
    assert [len(t) for t in tokenize(docs, ByteTokenizer(256))] == [5, len("user: 2+2?\nassistant: <think>4</think>4")]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_documents(tmp_path / "missing.jsonl")
    (tmp_path / "c.csv").write_text("x")
    with pytest.raises(ValueError, match="unrecognised data format 'c.csv'"):
        load_documents(tmp_path / "c.csv")
    (tmp_path / "d.jsonl").write_text(json.dumps({"content": "x"}))
    with pytest.raises(ValueError, match="d.jsonl:1: expected an object with a 'text'"):
        load_documents(tmp_path / "d.jsonl")


def test_parquet_needs_a_reader(tmp_path):
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        try:
            import pandas  # noqa: F401
        except ImportError:
            (tmp_path / "x.parquet").write_bytes(b"PAR1")
            with pytest.raises(ImportError, match="pip install pyarrow"):
                load_documents(tmp_path / "x.parquet")
            return
    pytest.skip("a parquet reader is installed")


def test_packing_is_exact_and_reproducible():
    docs = random_docs(30, 0)
    ds = PackedDataset(docs, SEQ, seed=3)
    stream = []
    for i in range(ds.rows_per_epoch):
        row = ds[i]
        cu = row.cu_seqlens
        assert row.input_ids.shape == row.position_ids.shape == (SEQ,)
        assert cu[0] == 0 and cu[-1] == SEQ and all(a < b for a, b in zip(cu, cu[1:]))
        for a, b in zip(cu, cu[1:]):
            assert torch.equal(row.position_ids[a:b], torch.arange(b - a))
        stream.append(row.input_ids)
    order = np.random.default_rng(3).permutation(len(docs))
    expected = np.concatenate([docs[i] for i in order])[: ds.rows_per_epoch * SEQ]
    assert np.array_equal(torch.cat(stream).numpy(), expected)
    again = PackedDataset(docs, SEQ, seed=3)
    assert torch.equal(again[ds.rows_per_epoch + 1].input_ids, ds[ds.rows_per_epoch + 1].input_ids)
    train, held = split_documents(list(range(20)), 0.2, seed=0)
    assert len(held) == 4 and sorted(train + held) == list(range(20))


# -- teacher and gate forward ---------------------------------------------------------------

def test_teacher_matches_model_and_captures_pre_rope():
    from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb

    model = random_qwen3(seed=1)
    row = PackedDataset(random_docs(6, 1, 60, 200), SEQ, 0)[0]
    assert len(row.cu_seqlens) > 2, "the row must pack several documents"
    seen = {}

    def on_layer(t):
        seen[t.layer_idx] = (t.q_pre.clone(), t.q.clone(), t.target.clone())

    cu = torch.tensor(row.cu_seqlens, dtype=torch.int32)
    with torch.no_grad(), teacher_attention(model, BS, cu, SEQ, on_layer):
        packed = model.base_model(input_ids=row.input_ids[None], position_ids=row.position_ids[None]).last_hidden_state
    assert model.config._attn_implementation == "sdpa", "the attention implementation must be restored"
    assert sorted(seen) == [0, 1]
    with torch.no_grad():
        for a, b in zip(row.cu_seqlens, row.cu_seqlens[1:]):  # each document alone, stock sdpa
            alone = model.base_model(input_ids=row.input_ids[None, a:b]).last_hidden_state
            assert_close("hidden states", alone, packed[:, a:b], 1e-5)
        attn = model.base_model.layers[0].self_attn
        x = model.base_model.layers[0].input_layernorm(model.base_model.embed_tokens(row.input_ids[None]))
        q_pre = attn.q_norm(attn.q_proj(x).view(1, SEQ, -1, 64))
        assert_close("pre-RoPE q", q_pre, seen[0][0], 1e-6)
        cos, sin = model.base_model.rotary_emb(x, row.position_ids[None])
        q_post, _ = apply_rotary_pos_emb(q_pre.transpose(1, 2), q_pre.transpose(1, 2), cos, sin)
        assert_close("post-RoPE q", q_post.transpose(1, 2), seen[0][1], 1e-6)
    target = seen[0][2]
    for a, b in zip(row.cu_seqlens, row.cu_seqlens[1:]):
        sums = target[0, :, a:b].sum(-1)
        has_block = torch.arange(b - a) >= BS
        torch.testing.assert_close(sums[:, has_block], torch.ones_like(sums[:, has_block]))
        assert torch.all(sums[:, ~has_block] == 0)


def test_training_logits_match_decode_scores():
    """Row t of the training logits is the decode path's gate_scores at cache length t+1."""
    torch.manual_seed(0)
    gate = build_gates(random_qwen3().config, DG)[0]
    q_pre, k_pre = torch.randn(150, 4, 64), torch.randn(150, 2, 64)
    first = 20
    with torch.no_grad():
        logits, mask = sequence_gate_logits(gate, q_pre, k_pre, first, BS)
        nb = logits.shape[-1]
        assert nb == (150 - 1) // BS
        pooled = ops.kpool(k_pre[None, : nb * BS], torch.tensor([nb * BS], dtype=torch.int32), BS)
        k_gate = gate.project_k(pooled, torch.arange(nb)[None] * BS)
        for t in (first, 47, 48, 149):
            q_gate = gate.project_q(q_pre[t][None], torch.tensor([t]))
            ref = ops.gate_scores(q_gate, k_gate, torch.tensor([t // BS], dtype=torch.int32))
            assert_close(f"scores at {t}", ref[0], logits[:, t - first].softmax(-1), 1e-5)
            assert mask[t - first].sum() == t // BS


# -- the training loop ----------------------------------------------------------------------

def test_training_lowers_heldout_kl_and_freezes_base():
    model = random_qwen3(seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = make_trainer(model, random_docs(60, 0))
    held = [PackedDataset(random_docs(8, 99), SEQ, 0)[i] for i in range(2)]
    kl0 = sum(trainer.heldout_kl(held))
    history = trainer.train(progress=False)
    kl1 = sum(trainer.heldout_kl(held))
    assert len(history) == 50
    assert kl1 <= 0.7 * kl0, f"held-out KL {kl0:.4f} -> {kl1:.4f}: less than a 30% drop"
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "base weights changed"
    assert not any(p.requires_grad for p in model.parameters())


def test_resume_reproduces_uninterrupted_run(tmp_path):
    model = random_qwen3(seed=0)
    docs = random_docs(30, 0)
    full = make_trainer(model, docs, steps=8, save_every=2)
    full.train(progress=False)

    class Interrupt(Exception):
        pass

    def stop_at_five(result):
        if result.step == 4:
            raise Interrupt

    first = make_trainer(model, docs, steps=8, save_every=2)
    with pytest.raises(Interrupt):
        first.train(tmp_path, progress=False, on_step=stop_at_five)
    resumed = make_trainer(model, docs, steps=8, save_every=2)
    assert resumed.load_checkpoint(tmp_path) and resumed.step == 4  # the last checkpoint
    resumed.train(tmp_path, progress=False)
    for (name, a), b in zip(full.gates.state_dict().items(), resumed.gates.state_dict().values()):
        assert torch.equal(a, b), f"{name} differs after resuming"
    assert [h["loss"] for h in full.history] == [h["loss"] for h in resumed.history]
    with pytest.raises(ValueError, match="other settings"):
        make_trainer(model, docs, steps=8, lr=5e-4).load_checkpoint(tmp_path)


def test_saved_gates_load_through_patch_model(tmp_path):
    from seerattn_r.checkpoint import save_gates
    from seerattn_r.config import SparseDecodeConfig
    from seerattn_r.integrations import patch_model, sparsity_stats, unpatch_model

    model = random_qwen3(seed=0)
    trainer = make_trainer(model, random_docs(30, 0), steps=3)
    trainer.train(progress=False)
    save_gates(trainer.gates.state_dict(), {"seerattn_gate_block_size": BS}, tmp_path)
    loaded, block_size = load_gate_modules(tmp_path, model.config, torch.device("cpu"))
    assert block_size == BS
    for a, b in zip(trainer.gates.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)

    prompt = torch.randint(0, 256, (1, 150), generator=torch.Generator().manual_seed(0))
    cfg = SparseDecodeConfig(block_size=BS, token_budget=2 * BS, min_sparse_length=0, gate_dim=DG)
    runs = []
    for gates in (tmp_path, trainer.gates):
        patch_model(model, cfg, gates=gates)
        out = model.generate(prompt, max_new_tokens=20, do_sample=False)
        runs.append((out, sparsity_stats(model)))
        unpatch_model(model)
    assert torch.equal(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1]
    assert runs[0][1]["sparsity"] > 0, "the budget must make decoding sparse"


# -- training really learns: a model whose attention is sparse by construction ---------------

MARKERS, MARKER_RATE, SPARSE_SEQ = 4, 1 / 64, 512


def sparse_attention_qwen3(seed: int = 0):
    """The tiny Qwen3 rebuilt so that a few "marker" tokens take almost all attention.

    * Every query is the same vector ``u`` (``q_proj`` weight 0, bias ``u``); ``u`` is
      ``+-c`` on the channels whose RoPE barely turns over the sequence (rope theta 1e12),
      0 on the fast ones, so logits do not depend on distance.
    * ``k_proj`` maps the marker embedding direction ``m`` onto ``u`` and everything else
      into the complement of ``u``; other tokens' embeddings are made orthogonal to ``m``.
      After ``k_norm``, a marker's key is ``u`` (logit ``|u|^2 / sqrt(D) = 8``) and every
      other key is orthogonal to ``u`` (logit ~0): markers dominate attention.
    * ``o_proj`` and the MLPs' ``down_proj`` are 0, so both layers see the embeddings.

    The gate can learn this from mean-pooled keys (a marker shifts its block's mean along
    ``u``). Quest cannot: ``u``'s entries are flat, so a marker never sets a block's
    per-channel key extremes, which come from the other 15 keys' spread.
    """
    model = random_qwen3(seed, attention_bias=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e12})
    gen = torch.Generator().manual_seed(seed)
    d, hidden = 64, model.config.hidden_size
    inv = model.base_model.rotary_emb.inv_freq
    slow = torch.cat([inv, inv]) * SPARSE_SEQ < 0.05
    u = (torch.randint(0, 2, (d,), generator=gen).float() * 2 - 1) * slow
    u = u / u.pow(2).mean().sqrt()
    m = torch.randn(hidden, generator=gen)
    m = m / m.norm()
    off_m = torch.eye(hidden) - torch.outer(m, m)
    off_u = torch.eye(d) - torch.outer(u, u) / (u @ u)
    with torch.no_grad():
        emb = model.base_model.embed_tokens.weight
        emb.copy_(emb @ off_m)
        emb[:MARKERS] = m * hidden**0.5
        for layer in model.base_model.layers:
            attn = layer.self_attn
            attn.q_proj.weight.zero_()
            attn.q_proj.bias.copy_(u.repeat(4))
            for proj in (attn.k_proj, attn.v_proj, attn.o_proj):
                proj.bias.zero_()
            w = attn.k_proj.weight.view(2, d, hidden)
            w.copy_(off_u @ w @ off_m + u[None, :, None] * m[None, None, :])
            attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return model


def marker_docs(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        tokens = rng.integers(MARKERS, 256, size=SPARSE_SEQ).astype(np.int32)
        marked = rng.random(SPARSE_SEQ) < MARKER_RATE
        tokens[marked] = rng.integers(0, MARKERS, size=int(marked.sum()))
        docs.append(tokens)
    return docs


def test_trained_gate_beats_quest_on_sparse_attention():
    model = sparse_attention_qwen3()
    torch.manual_seed(0)
    config = TrainConfig(block_size=BS, gate_dim=DG, steps=160, seq_len=SPARSE_SEQ, grad_accum=1,
                         lr=1e-2, warmup_steps=5)
    trainer = GateTrainer(model, build_gates(model.config, DG), PackedDataset(marker_docs(40, 0), SPARSE_SEQ, 0),
                          config)
    trainer.train(progress=False)
    held = PackedDataset(marker_docs(2, 1), SPARSE_SEQ, 1)
    budget = 4 * BS
    result = evaluate_gates(model, trainer.gates, [held[0], held[1]], BS, budgets=(budget,), stride=4)
    recall = {m: result["mean"]["recall"][m][str(budget)] for m in ("gate", "oracle", "quest")}
    assert recall["oracle"] > 0.8, f"the construction must make attention sparse: {recall}"
    assert recall["gate"] > recall["quest"] + 0.2, recall
    assert recall["gate"] >= recall["oracle"] - 0.05, recall


# -- command line ---------------------------------------------------------------------------

def test_cli_train_and_eval(tmp_path, capsys):
    from seerattn_r.cli import main

    data = tmp_path / "data.jsonl"
    rng = np.random.default_rng(0)
    data.write_text("".join(json.dumps({"text": "".join(rng.choice(list("abcdefgh \n"), 300))}) + "\n"
                            for _ in range(20)))
    out = tmp_path / "gates"
    args = ["train", "--data", str(data), "--out", str(out), "--seq-len", "256", "--steps", "3",
            "--grad-accum", "1", "--block-size", "16", "--gate-dim", "64", "--warmup-steps", "1",
            "--save-every", "2", "--eval-fraction", "0.2", "--no-progress", "--device", "cpu"]
    assert main(args) == 0
    assert {"config.json", "attn_gate_weights.safetensors", "train_state.pt", "train_log.json"} <= {
        p.name for p in out.iterdir()}
    assert json.loads((out / "config.json").read_text())["seerattn_gate_block_size"] == 16
    assert main(args) == 2, "an existing checkpoint needs --resume"
    assert main(args + ["--resume"]) == 0
    assert main(["eval-gates", "--data", str(data), "--gates", str(out), "--seq-len", "256",
                 "--eval-fraction", "0.2", "--budgets", "32", "64", "--stride", "8", "--device", "cpu"]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert set(result["mean"]["recall"]) == {"gate", "oracle", "quest"}
    assert "gate@32" in capsys.readouterr().out
