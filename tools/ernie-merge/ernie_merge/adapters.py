"""Read a LoRA adapter in any of the three formats into one form: low-rank deltas and whole-tensor replacements,
each addressed to a base tensor by its Paddle-layout name and oriented as Paddle stores it ([in, out]).

  ernie-tools    adapter_config.json {"format": "ernie-tools-lora"} + adapter_model.safetensors
                 (docs/formats/adapter.md): `M.lora_A [in, r]`, `M.lora_B [r, out]`, M a Paddle module name
  PaddleFormers  lora_config.json + peft_model.safetensors or peft_model-*.safetensors + index (ERNIEKit):
                 the same names and orientation; `rslora`; other trained tensors are whole replacements
  PEFT           adapter_config.json {"peft_type": "LORA"} + adapter_model.safetensors: HF names
                 (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight [r, in]`, `lora_B.weight
                 [out, r]`), embeddings `lora_embedding_A [r, V]` / `lora_embedding_B [h, r]`, modules_to_save
                 and `base_layer` weights as whole tensors; `use_rslora`, `rank_pattern`, `alpha_pattern`

Paddle-orientation merge: `W[:, off:off+n] += scaling * A @ B`. A PEFT q/k/v (or gate/up) adapter lands on a
column block of the fused qkv_proj (up_gate_proj) at the part's offset. Nothing here imports paddle.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field

import numpy as np

from libernie.checkpoint.names import FUSED_LINEAR, LINEAR, SAME, Rule, rules
from libernie.checkpoint.safetensors_io import SafetensorsFile, to_float32
from libernie.config import ErnieConfig
from libernie.lora_files import WEIGHTS_FILE, read_adapter as read_ernie_tools_adapter
from libernie.errors import CheckpointError, LoRAError

TIED_HEAD = "lm_head.weight"
EMBED = "ernie.embed_tokens.weight"


@dataclass
class Delta:
    target: str            # Paddle-layout base tensor name
    a: np.ndarray          # [in, r] fp32
    b: np.ndarray          # [r, n] fp32; lands on columns offset..offset+n of the target
    scaling: float
    offset: int = 0
    source: str = ""       # adapter tensor name, for messages


@dataclass
class Replace:
    target: str
    value: np.ndarray      # fp32, Paddle orientation; replaces the last-axis block offset..offset+width
    offset: int = 0
    source: str = ""


@dataclass
class Adapter:
    path: str
    kind: str                          # "ernie-tools", "paddleformers" or "peft"
    deltas: list[Delta] = field(default_factory=list)
    replacements: list[Replace] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def targets(self) -> set[str]:
        return {d.target for d in self.deltas} | {r.target for r in self.replacements}

    def scalings(self) -> list[float]:
        return sorted({d.scaling for d in self.deltas})


# ---- the base's tensors, by name in either layout ------------------------------------------------------
class Targets:
    """Where each base tensor name (Paddle or HF) lands: (Paddle name, Paddle shape, kind, part offset, part width).
    A tied base has no lm_head tensor; the adapter may still address one (the head is then E^T, [h, V])."""

    def __init__(self, cfg: ErnieConfig):
        table = list(rules(cfg))
        if cfg.tie_word_embeddings:
            table.append(Rule(TIED_HEAD, (TIED_HEAD,), LINEAR, (), (cfg.hidden_size, cfg.vocab_size)))
        self.paddle = {r.paddle: r for r in table}
        self.hf = {}
        for r in table:
            widths = r.split or (r.paddle_shape[-1],)
            offsets = np.cumsum((0,) + tuple(widths))[:-1]
            for name, off, w in zip(r.hf, offsets, widths):
                self.hf[name] = (r, int(off), int(w))

    def shape(self, target: str) -> tuple[int, ...]:
        return self.paddle[target].paddle_shape


def check(adapter: Adapter, targets: Targets, where: str) -> None:
    """Every delta and replacement must fit its base tensor; raise LoRAError naming the first that does not."""
    for d in adapter.deltas:
        shape = targets.shape(d.target)
        ok = (len(shape) == 2 and d.a.ndim == d.b.ndim == 2 and d.a.shape[1] == d.b.shape[0]
              and d.a.shape[0] == shape[0] and d.offset + d.b.shape[1] <= shape[1])
        if not ok:
            raise LoRAError(f"{where}: {d.source} gives a delta of shape [{d.a.shape[0]}, {d.b.shape[-1]}] "
                            f"(rank {d.a.shape[-1]}) for {d.target} {list(shape)}; was it trained on another base?")
    for r in adapter.replacements:
        shape = targets.shape(r.target)
        want = shape[:-1] + (r.value.shape[-1],)
        if r.value.shape != want or r.offset + r.value.shape[-1] > shape[-1]:
            raise LoRAError(f"{where}: {r.source} has shape {list(r.value.shape)}, base tensor {r.target} "
                            f"needs {list(want)}; was it trained on another base?")
    # A diverged run's adapter would merge into NaN weights that load and serve garbage without a word.
    arrays = [(f"{d.source} (A or B)", x) for d in adapter.deltas for x in (d.a, d.b)]
    for source, x in arrays + [(r.source, r.value) for r in adapter.replacements]:
        if not np.isfinite(x).all():
            raise LoRAError(f"{where}: {source} holds NaN or infinite values (its training diverged?); "
                            "merge an earlier checkpoint")


def _unmatched(names: list[str], where: str) -> LoRAError:
    shown = ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")
    return LoRAError(f"{where}: {len(names)} adapter tensor(s) match no base tensor: {shown}; "
                     "is this adapter for this base model (num_hidden_layers, tie_word_embeddings)?")


def _load_json(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            d = json.loads(f.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoRAError(f"{path}: invalid JSON ({e}); fix or regenerate it") from None
    if not isinstance(d, dict):
        raise LoRAError(f"{path}: expected a JSON object")
    return d


def _tensors(paths: list[str]) -> dict[str, tuple[np.ndarray, str]]:
    """{name: (fp32 array, file)} of every tensor in the safetensors files (adapters are small)."""
    out = {}
    for p in paths:
        sf = SafetensorsFile(p)
        for n in sf.names:
            try:
                out[n] = (to_float32(np.asarray(sf.get(n)), sf.dtype(n)).copy(), p)
            except CheckpointError:
                raise LoRAError(f"{p}: tensor {n} has dtype {sf.dtype(n)}; LoRA tensors must be float") from None
    return out


def _need(d: dict, key: str, path: str, kind=(int, float)):
    v = d.get(key)
    if not isinstance(v, kind) or isinstance(v, bool) or v <= 0:
        raise LoRAError(f"{path}: {key} must be a positive number, got {v!r}")
    return v


def _scaling(alpha: float, r: int, rslora: bool) -> float:
    return float(alpha) / (math.sqrt(r) if rslora else r)


# ---- the three formats ----------------------------------------------------------------------------------
def read_adapter(path, cfg: ErnieConfig) -> Adapter:
    """Detect the format of adapter directory `path` and read it against base config `cfg`."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise LoRAError(f"{path}: not found; pass an adapter directory (adapter_config.json or lora_config.json)")
    targets = Targets(cfg)
    ac, lc = os.path.join(path, "adapter_config.json"), os.path.join(path, "lora_config.json")
    if os.path.isfile(ac):
        meta = _load_json(ac)
        if "format" in meta:
            adapter = _read_ernie_tools(path, ac, meta, targets)
        elif meta.get("peft_type") == "LORA":
            adapter = _read_peft(path, ac, meta, targets)
        else:
            raise LoRAError(f"{ac}: neither an ernie-tools adapter (format) nor a PEFT LoRA (peft_type LORA, got "
                            f"{meta.get('peft_type')!r}); ernie-merge merges LoRA adapters only")
    elif os.path.isfile(lc):
        adapter = _read_paddleformers(path, lc, _load_json(lc), targets)
    else:
        raise LoRAError(f"{path}: no adapter_config.json (ernie-tools, PEFT) or lora_config.json (ERNIEKit); "
                        "is this an adapter directory?")
    check(adapter, targets, path)
    return adapter


def _read_ernie_tools(path, cpath, meta, targets: Targets) -> Adapter:
    # libernie.lora_files applies the spec's rules (docs/formats/adapter.md) without importing paddle.
    cfg, meta, tensors = read_ernie_tools_adapter(path)
    adapter = Adapter(path, "ernie-tools", config=meta)
    unmatched = [m for m in cfg.modules if m + ".weight" not in targets.paddle]
    if unmatched:
        raise _unmatched([m + ".lora_A" for m in unmatched], os.path.join(path, WEIGHTS_FILE))
    for m in cfg.modules:
        adapter.deltas.append(Delta(m + ".weight", tensors[m + ".lora_A"], tensors[m + ".lora_B"], cfg.scaling,
                                    0, m + ".lora_A"))
    return adapter


def _read_paddleformers(path, cpath, meta, targets: Targets) -> Adapter:
    for flag in ("loraga", "pissa", "use_mora", "lora_use_mixer", "do_qat"):
        if meta.get(flag):
            raise LoRAError(f"{cpath}: {flag}=true adapters change the base weights or the layer itself; "
                            "merge them with PaddleFormers' own merge script")
    if meta.get("enable_lora_list"):
        raise LoRAError(f"{cpath}: enable_lora_list (MergedLoRALinear) is not supported")
    r = _need(meta, "r", cpath, int)
    scaling = _scaling(_need(meta, "lora_alpha", cpath), r, bool(meta.get("rslora", False)))
    files = _paddleformers_files(path)
    tensors = _tensors(files)
    adapter, unmatched = Adapter(path, "paddleformers", config=meta), []
    for name in sorted(tensors):
        # PaddleFormers names parameters of the ERNIE model `ernie.`; pipeline-parallel exports may say `model.`
        canon = "ernie." + name[6:] if name.startswith("model.") else name
        if canon.endswith(".lora_B"):
            continue
        if canon.endswith(".lora_A"):
            module = canon[: -len(".lora_A")]
            b_name = name[: -len(".lora_A")] + ".lora_B"
            if module + ".weight" not in targets.paddle or b_name not in tensors:
                unmatched.append(name)
                continue
            adapter.deltas.append(Delta(module + ".weight", tensors[name][0], tensors[b_name][0], scaling, 0, name))
        elif canon in targets.paddle:  # trainable_modules: saved whole
            adapter.replacements.append(Replace(canon, tensors[name][0], 0, name))
        else:
            unmatched.append(name)
    orphans = [n for n in tensors if n.endswith(".lora_B") and n[: -len(".lora_B")] + ".lora_A" not in tensors]
    if unmatched or orphans:
        raise _unmatched(unmatched + orphans, files[0])
    return adapter


def _paddleformers_files(path) -> list[str]:
    index = os.path.join(path, "peft_model.safetensors.index.json")
    if os.path.isfile(index):
        wm = _load_json(index).get("weight_map")
        if not isinstance(wm, dict):
            raise LoRAError(f"{index}: no weight_map; regenerate the index")
        return [os.path.join(path, f) for f in sorted(set(wm.values()))]
    for single in ("peft_model.safetensors", "adapter_model.safetensors"):
        if os.path.isfile(os.path.join(path, single)):
            return [os.path.join(path, single)]
    shards = sorted(f for f in os.listdir(path) if re.fullmatch(r"peft_model-\d+-of-\d+\.safetensors", f))
    if shards:
        return [os.path.join(path, f) for f in shards]
    if any(f.endswith(".pdparams") for f in os.listdir(path)):
        raise LoRAError(f"{path}: only pickled .pdparams LoRA weights, which ernie-merge never unpickles; re-save "
                        "the adapter as safetensors (PaddleFormers save_checkpoint_format=flex_checkpoint)")
    raise LoRAError(f"{path}: lora_config.json but no peft_model*.safetensors; is the adapter complete?")


_PEFT_LINEAR = re.compile(r"(.*)\.lora_([AB])(?:\.[A-Za-z0-9_-]+)?\.weight")
_PEFT_EMBED = re.compile(r"(.*)\.lora_embedding_([AB])(?:\.[A-Za-z0-9_-]+)?")


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern/alpha_pattern: a key matches a module name it ends (as whole components)."""
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?(?:{key})", module):
            return value
    return default


def _read_peft(path, cpath, meta, targets: Targets) -> Adapter:
    for flag, why in (("use_dora", "DoRA"), ("lora_bias", "LoRA biases"), ("layer_replication", "layer replication"),
                      ("use_qalora", "QA-LoRA"), ("trainable_token_indices", "trainable tokens")):
        if meta.get(flag):
            raise LoRAError(f"{cpath}: {flag} ({why}) is not supported by ernie-merge; merge with PEFT instead")
    r0 = _need(meta, "r", cpath, int)
    alpha0 = _need(meta, "lora_alpha", cpath)
    rslora = bool(meta.get("use_rslora", False))
    wpath = os.path.join(path, "adapter_model.safetensors")
    if not os.path.isfile(wpath):
        extra = " (adapter_model.bin is pickled; ernie-merge never unpickles)" if os.path.isfile(
            os.path.join(path, "adapter_model.bin")) else ""
        raise LoRAError(f"{wpath}: not found{extra}; save the adapter with safe_serialization=True")
    tensors = _tensors([wpath])
    adapter, unmatched, pairs = Adapter(path, "peft", config=meta), [], {}

    def hf_name(module: str) -> str | None:  # PEFT wraps the model: strip base_model.model.
        module = module[len("base_model.model."):] if module.startswith("base_model.model.") else module
        for cand in (module, "model." + module):
            if cand + ".weight" in targets.hf or cand in targets.hf:
                return cand
        return None

    for name in sorted(tensors):
        m = _PEFT_LINEAR.fullmatch(name) or _PEFT_EMBED.fullmatch(name)
        if m:
            pairs.setdefault((m.group(1), m.re is _PEFT_EMBED), {})[m.group(2)] = name
            continue
        base = name.replace(".base_layer.", ".")  # save_embedding_layers / modules_to_save: whole tensors
        module = hf_name(base)
        if module is None or module not in targets.hf:
            unmatched.append(name)
            continue
        rule, off, _ = targets.hf[module]
        value = tensors[name][0]
        value = value.T if rule.kind in (LINEAR, FUSED_LINEAR) else value
        adapter.replacements.append(Replace(rule.paddle, np.ascontiguousarray(value), off, name))

    for (module, embedding), ab in sorted(pairs.items()):
        key = hf_name(module)
        if key is None or set(ab) != {"A", "B"}:
            unmatched += sorted(ab.values())
            continue
        rule, off, _ = targets.hf[key + ".weight"]
        short = key  # pattern keys are matched against module names without the PEFT wrapper
        r = int(_pattern_value(meta.get("rank_pattern"), short, r0))
        alpha = _pattern_value(meta.get("alpha_pattern"), short, alpha0)
        a, b = tensors[ab["A"]][0], tensors[ab["B"]][0]
        if a.shape[0] != r:
            raise LoRAError(f"{wpath}: {ab['A']} has rank {a.shape[0]}, adapter_config.json says r={r}")
        if embedding:   # E[V, h] += s * (B @ A)^T = s * A^T @ B^T, with A [r, V], B [h, r]
            if rule.kind != SAME:
                unmatched += sorted(ab.values())
                continue
        elif rule.kind not in (LINEAR, FUSED_LINEAR):
            unmatched += sorted(ab.values())
            continue
        # Linear: W_hf[out, in] += s * B @ A  <=>  W_paddle[in, out] += s * A^T @ B^T (same transposes as above)
        adapter.deltas.append(Delta(rule.paddle, np.ascontiguousarray(a.T), np.ascontiguousarray(b.T),
                                    _scaling(alpha, r, rslora), off, ab["A"]))
    if unmatched:
        raise _unmatched(unmatched, wpath)
    return adapter


__all__ = ["Adapter", "Delta", "Replace", "Targets", "read_adapter", "TIED_HEAD", "EMBED"]
