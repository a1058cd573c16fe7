"""Issue 11's rules for the doctor as a whole: the same counts everywhere, facts found once, findings not crashes.

- check, probe and train count the same training examples (after the eval hold-out) and the same optimizer
  steps, so count-based findings (rank-too-large, few-optimizer-steps, ...) fire in all or none;
- the data checks' facts are found while the data loads: build_context reads them off DataStats and never
  reads or tokenizes the data again;
- bad data that would crash inside probe's first step is refused before it and reported as the finding.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from chat_fixtures import CONVERSATION, tiny_chat_model_dir
from lora_doctor.chat.templates import CHATML_TAGGED
from lora_doctor.checks import build_context, run_checks
from lora_doctor.runconfig import from_dict

ROWS = [{"instruction": f"Add {i} and {i + 1}.", "output": f"{2 * i + 1}."} for i in range(30)]
CHAT = [{"messages": [dict(m, content=m["content"] + f" {i}") for m in CONVERSATION]} for i in range(10)]
COUNTED = {"rank-too-large", "few-optimizer-steps", "max-steps-before-epochs", "max-steps-repeats-data",
           "warmup-exceeds-run", "eval-overlaps-train", "duplicate-rows"}
"""Findings that rest on the example and step counts."""


def _config(tmp_path: Path, model: Path, rows, data: dict, train: dict, lora: dict | None = None):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return from_dict({"model": str(model), "quant": {"mode": None}, "lora": {"r": 4, "dropout": 0.0, **(lora or {})},
                      "data": {"path": str(path), "max_length": 64, **data},
                      "train": {"batch": 2, "optim": "adamw", **train},
                      "output": {"dir": str(tmp_path / "run"), "reports_dir": str(tmp_path / "r")}})


def _check_side(cfg):
    """check's own reading (commands/check.py) and the context its findings come from."""
    from lora_doctor.commands.check import gather

    facts = gather(cfg)
    ctx = build_context(config=cfg, shape=facts.shape, tokenizer=facts.tokenizer, data_stats=facts.data,
                        labels=facts.labels, trainable_params=facts.trainable_params,
                        resolved_targets=facts.resolved_targets)
    return facts.data, ctx


SETUPS = {
    "plain": (ROWS, {}, {"max_steps": None}),
    "eval-fraction": (ROWS, {"eval_fraction": 0.2}, {"max_steps": None, "grad_accum": 2}),
    "eval-path": (ROWS, {"eval_path": "eval.jsonl"}, {"max_steps": None, "epochs": 2}),
    "max-steps-vs-epochs": (ROWS + ROWS[:5], {"eval_fraction": 0.1}, {"max_steps": 4, "epochs": 3}),
    "grad-accum-few-steps": (ROWS[:12], {}, {"max_steps": None, "grad_accum": 4, "warmup_steps": 5}),
    "chat": (CHAT, {"format": "chat", "eval_fraction": 0.3, "max_length": 256}, {"max_steps": None}),
    "rank": (ROWS[:10], {"eval_fraction": 0.2}, {"max_steps": None}),
}


@pytest.mark.parametrize("name", list(SETUPS))
def test_check_probe_and_train_count_the_same_examples_and_steps(name, tmp_path, tiny_llama_dir):
    from lora_doctor.checks.datafacts import optimizer_steps
    from lora_doctor.diagnose import doctor_findings, predict_memory
    from lora_doctor.engine import Engine

    rows, data, train = SETUPS[name]
    model = Path(tiny_chat_model_dir()) if data.get("format") == "chat" else Path(tiny_llama_dir)
    if "eval_path" in data:
        (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[:3] + [
            {"instruction": "Unseen.", "output": "x"}]))
        data = dict(data, eval_path=str(tmp_path / "eval.jsonl"))
    lora = {"r": 64, "targets": "all-linear"} if name == "rank" else None
    cfg = _config(tmp_path, model, rows, data, train, lora)
    stats, ctx = _check_side(cfg)
    engine = Engine(cfg).setup()  # what probe and train run on
    loaded = engine.data
    assert stats.n_examples == loaded.stats.n_examples == len(loaded.train) == ctx.n_examples
    assert stats.n_eval_examples == loaded.stats.n_eval_examples == len(loaded.eval) == ctx.n_eval_examples
    t = cfg.train
    assert optimizer_steps(ctx.n_examples, ctx.batch_size, 1, ctx.grad_accum, ctx.epochs, ctx.max_steps) \
        == engine.total_steps
    assert ctx.trainable_params == engine.model_info.trainable_params
    check_codes = {f.code for f in run_checks(ctx)} & COUNTED
    run = engine.result("train")  # what diagnose hands the doctor after the run
    run_codes = {f.code for f in doctor_findings(cfg, engine, run, predict_memory(cfg), {})} & COUNTED
    assert check_codes == run_codes, (check_codes, run_codes)
    if name == "rank":  # the planted count-based finding fires in both
        assert "rank-too-large" in check_codes
    if name == "grad-accum-few-steps":
        assert {"few-optimizer-steps", "warmup-exceeds-run"} <= check_codes and t.grad_accum == 4


def test_build_context_reads_the_loaded_facts_and_never_the_data_again(tmp_path, tiny_tokenizer, monkeypatch):
    """The facts on DataStats equal a fresh reading's (datafacts.dataset_facts), and build_context takes them
    with every reader and tokenizer disabled."""
    from lora_doctor import data as data_module
    from lora_doctor.checks import datafacts
    from lora_doctor.data import load_data

    rows = ROWS[:12] + ROWS[:3] + [{"instruction": "USER: hi\nASSISTANT:", "output": "USER: hi\nASSISTANT:"}]
    for eval_data in ({"eval_fraction": 0.25}, {}):
        cfg = _config(tmp_path, tmp_path, rows, eval_data, {"max_steps": None}).replace(
            **{"model": "tiny", "data.prompt_template": "<s><s>### Instruction:\n{instruction}\n\n### Response:\n"})
        fresh = datafacts.dataset_facts(cfg, tiny_tokenizer, 256)
        stats = load_data(cfg.data, tiny_tokenizer, seed=cfg.train.seed).stats
        with monkeypatch.context() as m:
            for mod, fn in ((data_module, "read_rows"), (data_module, "tokenize_rows"), (datafacts, "read_rows"),
                            (datafacts, "dataset_facts"), (datafacts, "eval_facts")):
                m.setattr(mod, fn, lambda *a, **k: pytest.fail("the data was read again"), raising=False)
            ctx = build_context(config=cfg, tokenizer=tiny_tokenizer, data_stats=stats)
        for key in ("n_rows", "n_duplicate_rows", "n_echo_responses", "template_markers", "input_id_max",
                    "n_prompt_fills", "n_double_bos"):
            assert getattr(ctx, key) == fresh[key], key
        assert ctx.n_duplicate_rows == 3 and ctx.n_echo_responses == 1 and ctx.n_double_bos == 16
        assert ctx.n_eval_overlap == fresh.get("n_eval_overlap", 0)
        assert stats.to_dict().get("facts") is None  # the doctor's inputs stay out of the report


# --- findings, not crashes ---------------------------------------------------------------------------------


def _chat_model_with_token_past_rows(tmp_path: Path) -> Path:
    from transformers import AutoTokenizer

    folder = Path(shutil.copytree(tiny_chat_model_dir(), tmp_path / "chat-extra"))
    tok = AutoTokenizer.from_pretrained(folder)
    tok.add_special_tokens({"additional_special_tokens": ["<extra_0>"]})
    tok.save_pretrained(folder)
    return folder


def _probe_case(name: str, tmp_path: Path, tiny_llama_dir, tiny_gpt2_dir):
    if name == "trainable-token-indices":
        return _config(tmp_path, Path(tiny_llama_dir), ROWS, {}, {"max_steps": 2},
                       {"trainable_token_indices": [5, 9999]}), "trainable-token-index-out-of-range"
    if name == "template-token":
        return _config(tmp_path, _chat_model_with_token_past_rows(tmp_path), CHAT, {
            "format": "chat", "max_length": 256, "chat_template": CHATML_TAGGED.replace("<|im_start|>", "<extra_0>")},
            {"max_steps": 2}), "chat-special-token-outside-embedding"
    if name == "example-past-positions":
        long = [{"instruction": "word " * 200, "output": "word " * 100}]
        return _config(tmp_path, Path(tiny_gpt2_dir), ROWS + long, {"max_length": 512}, {"max_steps": 2}), \
            "beyond-context"
    raise KeyError(name)


@pytest.mark.parametrize("name", ["trainable-token-indices", "template-token", "example-past-positions"])
def test_probe_turns_an_index_crash_into_the_finding(name, tmp_path, tiny_llama_dir, tiny_gpt2_dir):
    """Each of these is an IndexError inside peft's wrap or the first step; probe refuses it before and reports
    the finding check reports (an id past the embedding in the data: test_engine; labels are a subset of the
    input ids, so a label past the rows is that same finding)."""
    from lora_doctor.commands.probe import run_probe
    from lora_doctor.engine import BadData, Engine

    cfg, code = _probe_case(name, tmp_path, tiny_llama_dir, tiny_gpt2_dir)
    with pytest.raises(BadData) as refused:
        Engine(cfg).setup()
    assert refused.value.code == code
    result, report, findings = run_probe(cfg, steps=1)
    assert result is None
    (f,) = [f for f in findings if f.code == code]
    assert f.severity.value == "error" and report["verdict"]["errors"] >= 1
    _, ctx = _check_side(cfg)
    assert code in {f.code for f in run_checks(ctx) if f.severity.value == "error"}
