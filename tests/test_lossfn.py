"""lossfn.CausalLMLoss: the chunked head + loss equals the full-logits path, in loss and gradients, on several
architectures; the self-check catches a head it cannot reproduce; the engine trains the same with it, and
with activation offload; its step peak is lower at a large vocabulary."""

import contextlib
import weakref

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lora_doctor.data import IGNORE_INDEX
from lora_doctor.lossfn import CausalLMLoss, build_loss, logit_transform
from lora_doctor.optim import token_loss_sum
from lora_doctor.runconfig import LossConfig, from_dict
from lora_doctor.tiny import build_tiny_model
from data_helpers import write_learnable_data

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=3)
# Architectures not in tiny.TINY_CONFIGS, each with a different transform after lm_head.
EXTRA_CONFIGS = {
    "gemma2": dict(model_type="gemma2", head_dim=16, query_pre_attn_scalar=16, sliding_window=64,
                   final_logit_softcapping=30.0, tie_word_embeddings=True, **SMALL),
    "cohere": dict(model_type="cohere", logit_scale=0.25, tie_word_embeddings=True, **SMALL),
    "granite": dict(model_type="granite", logits_scaling=4.0, tie_word_embeddings=False, **SMALL),
}
TARGETS = {"gpt2": ["c_attn"], "phi3": ["qkv_proj", "o_proj"]}
KINDS = ("ce", "label_smoothing", "focal")
LOSS = LossConfig(label_smoothing=0.1, focal_gamma=2.0)


def build(arch: str, vocab: int = 512, seed: int = 0):
    """A random tiny model of `arch` with no dropout anywhere (the two paths would draw different masks)."""
    if arch not in EXTRA_CONFIGS:
        extra = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0) if arch == "gpt2" else {}
        return build_tiny_model(arch, vocab_size=vocab, seed=seed, **extra)
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(EXTRA_CONFIGS[arch])
    cfg = AutoConfig.for_model(kwargs.pop("model_type"), vocab_size=vocab, **kwargs)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager")


def peft_of(model, arch: str, head: str):
    """LoRA on attention, with lm_head as a LoRA target ('lora'), in modules_to_save ('saved') or frozen ('frozen')."""
    targets = list(TARGETS.get(arch, ["q_proj", "v_proj"]))
    kwargs = {}
    if head == "lora":
        targets.append("lm_head")
    elif head == "saved":
        kwargs["modules_to_save"] = ["lm_head"]
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, **kwargs))
    with torch.no_grad():  # lora_B starts at zero: give it values so the adapters change the logits and get gradients
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    pm.train()
    return pm


def batch(vocab: int = 512, b: int = 3, t: int = 13, seed: int = 1):
    """Right-padded ids with a masked prompt, so IGNORE_INDEX appears mid-row and at the end."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, t - 4:] = 0
    labels = ids.clone()
    labels[:, :3] = IGNORE_INDEX
    labels[mask == 0] = IGNORE_INDEX
    return ids, mask, labels


def loss_and_grads(fn: CausalLMLoss, ids, mask, labels, kind):
    fn.zero_grad(set_to_none=True)
    loss = fn(ids, mask, labels, kind=kind)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in fn.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("head", ["lora", "saved", "frozen"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3", "gpt2", "gemma2", "cohere", "granite"])
def test_chunked_equals_full_loss_and_gradients(arch, head):
    pm = peft_of(build(arch), arch, head)
    fn = CausalLMLoss(pm, LOSS, chunks=5)  # 12 shifted positions in 5 uneven chunks
    ids, mask, labels = batch()
    for kind in KINDS:
        fn.chunks = 5
        chunked, g_chunked = loss_and_grads(fn, ids, mask, labels, kind)
        fn.chunks = None
        full, g_full = loss_and_grads(fn, ids, mask, labels, kind)
        torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)
        assert g_chunked.keys() == g_full.keys() and any("lm_head" in n for n in g_full) == (head != "frozen")
        for name in g_full:
            torch.testing.assert_close(g_chunked[name], g_full[name], rtol=1e-4, atol=1e-6, msg=name)
    # The full path is optim.token_loss_sum on the model's own logits: same definition as before this module.
    with torch.no_grad():
        ref = token_loss_sum(pm(input_ids=ids, attention_mask=mask).logits, labels, LOSS, "ce")
        fn.chunks = 3
        torch.testing.assert_close(fn(ids, mask, labels, kind="ce"), ref, rtol=1e-5, atol=1e-5)


def test_chunked_loss_under_gradient_checkpointing_and_bf16_autocast():
    """The engine's QLoRA-style setting: checkpointed body, bf16 autocast; chunking only re-slices the same ops."""
    model = build("llama")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    pm = peft_of(model, "llama", "lora")
    fn = CausalLMLoss(pm, LOSS, chunks=4)
    ids, mask, labels = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chunked, g_chunked = loss_and_grads(fn, ids, mask, labels, "ce")
        fn.chunks = None
        full, g_full = loss_and_grads(fn, ids, mask, labels, "ce")
    torch.testing.assert_close(chunked, full, rtol=2e-3, atol=1e-2)
    for name in g_full:
        # bf16 rounding: a full-sequence weight gradient is one bf16 matmul, a chunked one sums 4 in fp32.
        scale = float(g_full[name].abs().max())
        torch.testing.assert_close(g_chunked[name], g_full[name], rtol=2e-2, atol=1e-2 * scale, msg=name)


@pytest.mark.parametrize(("arch", "expect"), [("gemma2", 30.0 * torch.tanh(torch.tensor(2.0)).item()),
                                              ("cohere", 15.0), ("granite", 15.0), ("llama", 60.0)])
def test_logit_transform_reads_each_architecture(arch, expect):
    transform = logit_transform(build(arch))
    out = transform(torch.tensor(60.0)).item() if transform is not None else 60.0
    assert out == pytest.approx(expect, rel=1e-6)


def _cfg(**train):
    return from_dict({"model": "x", "quant": {"mode": None}, "train": {"precision": "fp32", **train}})


def test_self_check_passes_on_known_heads_and_catches_an_unknown_transform():
    # Gemma-2 with its softcap: the check scales logits to ~60, where a missed tanh would be off by half.
    notes = []
    fn, off = build_loss(peft_of(build("gemma2"), "gemma2", "lora"), _cfg(), "cpu",
                         autocast=contextlib.nullcontext, note=notes.append)
    assert fn.chunks == 8 and off == {} and notes == []
    # Forgetting the softcap is caught: the module falls back to the full-logits path, with a note.
    import lora_doctor.lossfn as lossfn

    fn = CausalLMLoss(peft_of(build("gemma2"), "gemma2", "frozen"), LOSS, chunks=8)
    fn._parts = (fn._parts[0], fn._parts[1], None)
    assert fn.head_mismatch("cpu", contextlib.nullcontext).startswith("largest logit difference")
    # An architecture whose forward does something after lm_head that lossfn does not know about.
    model = build("llama")
    model.register_forward_hook(lambda m, a, out: out.__setitem__("logits", out["logits"] * 0.5) or out)
    fn, off = build_loss(peft_of(model, "llama", "frozen"), _cfg(), "cpu", autocast=contextlib.nullcontext,
                         note=notes.append)
    assert fn.chunks is None and set(off) == {"train.chunked_loss"} and "llama head" in off["train.chunked_loss"]
    assert len(notes) == 1 and notes[0].startswith("note: chunked loss off:")
    ids, mask, labels = batch()
    with torch.no_grad():  # the fallback is the model's own logits, hook included: never a wrong loss
        ref = token_loss_sum(fn.peft_model(input_ids=ids, attention_mask=mask).logits, labels, LOSS, "ce")
        torch.testing.assert_close(fn(ids, mask, labels, kind="ce"), ref)
    # Switched off in the config: no self-check, no note.
    fn, off = build_loss(peft_of(build("llama"), "llama", "frozen"), _cfg(chunked_loss=False), "cpu",
                         autocast=contextlib.nullcontext)
    assert fn.chunks is None and off == {}
    assert lossfn.SELF_CHECK_LOGIT > 2 * 30.0 - 1  # Gemma-2's cap, doubled: what the scaled check relies on


def test_offload_moves_the_checkpointed_layer_inputs_and_changes_nothing(monkeypatch):
    model = build("llama")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    pm = peft_of(model, "llama", "lora")
    ids, mask, labels = batch()
    plain = loss_and_grads(CausalLMLoss(pm, LOSS, chunks=4), ids, mask, labels, "focal")
    packed = []

    class CountingSaveOnCpu(torch.autograd.graph.save_on_cpu):
        def __init__(self, pin_memory=False, device_type="cuda"):
            super().__init__(pin_memory, device_type)
            pack = self.pack_hook
            self.pack_hook = lambda t: packed.append(tuple(t.shape)) or pack(t)

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", CountingSaveOnCpu)
    offloaded = loss_and_grads(CausalLMLoss(pm, LOSS, chunks=4, offload=True), ids, mask, labels, "focal")
    torch.testing.assert_close(offloaded, plain)
    # Non-reentrant checkpointing saves each layer's input through the saved-tensor hooks, so the offload
    # gets the residual stream (B, T, H) of both layers plus the final norm's input, and each loss chunk's
    # hidden states; nothing of size V (the chunks' logits are recomputed, never saved).
    assert packed.count((3, 13, 64)) >= 3 and packed.count((3, 3, 64)) == 4, packed
    assert not any(512 in shape for shape in packed), packed


# --- the engine, end to end ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    return write_learnable_data(tmp_path_factory.mktemp("data"), 12)


def engine_losses(model_dir, data_path, out, steps=3, quant=None, **train):
    from lora_doctor.engine import Engine

    raw = {"model": str(model_dir), "lora": {"r": 4, "dropout": 0.0, "targets": "all-linear"},
           "data": {"path": str(data_path), "max_length": 32, "eval_fraction": 0.25},
           "train": {"batch": 3, "max_steps": steps, "lr": 1e-2, "grad_ckpt": True, "optim": "adamw",
                     "precision": "fp32", "eval_every": steps, **train},
           "quant": {"mode": quant}, "output": {"dir": str(out), "reports_dir": str(out / "reports")}}
    engine = Engine(from_dict(raw)).setup()
    engine.run_steps(steps)
    return engine, [s.loss for s in engine.history] + [engine.eval_history[-1][1]]


def test_engine_trains_the_same_with_chunked_loss(tiny_llama_dir, data_path, tmp_path):
    chunked_engine, chunked = engine_losses(tiny_llama_dir, data_path, tmp_path / "a")
    _, full = engine_losses(tiny_llama_dir, data_path, tmp_path / "b", chunked_loss=False)
    assert isinstance(chunked_engine.model, CausalLMLoss) and chunked_engine.model.chunks == 8
    assert chunked_engine.model.peft_model is chunked_engine.peft_model and chunked_engine.levers_off == {}
    torch.testing.assert_close(chunked, full, rtol=1e-4, atol=1e-4)  # 3 train steps, then eval CE
    assert chunked[-2] < chunked[0]


@pytest.mark.slow  # two more engine runs, nf4 + bf16 (~10 s on 2 shared cores)
def test_engine_qlora_losses_match_and_offload_changes_nothing(tiny_llama_dir, data_path, tmp_path):
    qlora = {"quant": "nf4", "precision": "bf16", "optim": "paged-adamw-8bit"}
    engine, chunked = engine_losses(tiny_llama_dir, data_path, tmp_path / "a", **qlora)
    assert engine.model.chunks == 8 and engine.levers_off == {}  # the nf4 + bf16 head passes the self-check
    _, full = engine_losses(tiny_llama_dir, data_path, tmp_path / "b", chunked_loss=False, **qlora)
    _, offloaded = engine_losses(tiny_llama_dir, data_path, tmp_path / "c", offload_activations=True, **qlora)
    torch.testing.assert_close(chunked, full, rtol=2e-2, atol=2e-2)  # bf16: the head's matmul is split in 8
    torch.testing.assert_close(offloaded, chunked, rtol=1e-6, atol=1e-6)


# --- memory ------------------------------------------------------------------------------------------


class LiveTensorPeak(TorchDispatchMode):
    """Peak bytes of storages created under the mode and still alive (a weakref per storage sees it freed)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # A view of a tensor made before the mode (a weight's .t()) shares its storage: not a new allocation.
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                st = t.untyped_storage()
                key = st._cdata
                if key in self._seen or key in inputs:
                    continue
                self._seen.add(key)
                self.live += st.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(st, self._freed, key, st.nbytes())
        return out

    def _freed(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes


def step_peak_bytes(fn, ids, mask, labels) -> int:
    fn(ids, mask, labels, kind="ce").backward()  # warm-up: lazy inits are not part of a step
    fn.zero_grad(set_to_none=True)
    with LiveTensorPeak() as mode:
        fn(ids, mask, labels, kind="ce").backward()
    fn.zero_grad(set_to_none=True)
    return mode.peak


def test_chunked_loss_lowers_the_step_peak_at_a_large_vocabulary():
    vocab = 16384
    pm = peft_of(build("llama", vocab=vocab), "llama", "frozen")
    ids, mask, labels = batch(vocab=vocab, b=2, t=64)
    full = step_peak_bytes(CausalLMLoss(pm, LOSS, chunks=None), ids, mask, labels)
    chunked = step_peak_bytes(CausalLMLoss(pm, LOSS, chunks=8), ids, mask, labels)
    logits_fp32 = 2 * 63 * vocab * 4  # one (B, T-1, V) fp32 tensor
    # The full path holds the logits, their log-softmax and gradient together (measured: 3.1x logits_fp32);
    # the chunked one a chunk's worth of each (measured: 0.5x, 16% of the full path's peak).
    assert full > 2 * logits_fp32
    assert chunked < logits_fp32 and chunked < full / 3, (chunked, full)


# --- the report ------------------------------------------------------------------------------------


def test_levers_line_reads_the_config_and_the_engines_fallback():
    from lora_doctor.report.levers import LEVERS, levers_line, report_levers_line
    from lora_doctor.report.run import render_markdown
    from lora_doctor.report.summary import summary_lines
    from lora_doctor.runconfig import valid_keys

    assert {lever.key for lever in LEVERS} <= set(valid_keys())  # every row names a real config key
    config = _cfg().to_dict()
    rest = ", fp32 upcast of frozen weights off, adapter dtype fp32, packing off"
    assert levers_line(config) == "chunked loss on (8 chunks), gradient checkpointing on, activation offload off" + rest
    config = _cfg(loss_chunks=4, grad_ckpt=False, offload_activations=True).to_dict()
    assert levers_line(config) == "chunked loss on (4 chunks), gradient checkpointing off, activation offload on" + rest
    packed = {**config, "data": {**config["data"], "packing": True}, "quant": {**config["quant"], "upcast_frozen": True}}
    assert "fp32 upcast of frozen weights on" in levers_line(packed) and levers_line(packed).endswith("packing on")
    off = {"train.chunked_loss": "the cohere head did not reproduce the model's logits"}
    report = {"kind": "probe", "config": config, "extra": {"run": {"extra": {"levers_off": off}}}}
    line = report_levers_line(report)
    assert line.startswith("chunked loss off (the cohere head did not reproduce") and "activation offload on" in line
    assert f"  engine levers      {line}" in summary_lines(report)
    assert f"| Engine levers | {line} |" in render_markdown({**report, "model": {"id": "m"}})
    assert report_levers_line({"kind": "check", "config": config}) == ""  # a plan, not a run
    assert levers_line({"train": {"batch": 1}}) == ""  # a saved config from before the levers
