"""Export a trained GPT as a Hugging Face `transformers` folder, written by hand (transformers is not imported).

The folder loads offline with `AutoModelForCausalLM.from_pretrained(out)` and `AutoTokenizer.from_pretrained(out)`:

  config.json              GPT2LMHeadModel (learned positions) or LlamaForCausalLM (rotary), float32; a model
                           with a part neither computes (ReLU², QK-norm, a logit softcap, norms without gains:
                           the modern preset) is refused, naming the part (`hf_class`)
  model.safetensors        the weights under transformers' names, metadata {"format": "pt"}
  generation_config.json   bos/eos = <|endoftext|>
  tokenizer.json           our tokenizer, copied as is
  tokenizer_config.json    PreTrainedTokenizerFast over tokenizer.json; special_tokens_map.json
  chat_template.jinja      only for a tokenizer with the chat tokens (a tuned model's): llm/chat.py's template, also
                           in tokenizer_config.json; generation_config.json then ends a turn at <|end|> too
  .llm-export.json         the marker: this tool, the source model and the files it wrote (`MARKER`)

The export replaces only what it wrote itself (`check_out`): a new or empty folder, or an earlier export whose
marker lists every file in it. Anything else is refused before a byte is written: a plain file, a link, a folder of
the user's files (an earlier export the user added a model card or a `.git` to included), and any folder that is or
holds the working directory, the project, the model being exported or its tokenizer. The replacement is atomic:
the new folder is written beside the old one and renamed over it once whole.

Weight names, ours -> transformers (i is the layer):

  gpt2   wte, wpe, ln_f                 -> transformer.wte, transformer.wpe, transformer.ln_f
         blocks.i.{ln_1, ln_2, attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj}
                                        -> transformer.h.i.{same names}
         lm_head (tied to wte)          -> not stored; tie_word_embeddings restores it
  llama  wte, ln_f, lm_head (untied)    -> model.embed_tokens, model.norm, lm_head
         blocks.i.ln_1, blocks.i.ln_2   -> model.layers.i.input_layernorm, model.layers.i.post_attention_layernorm
         blocks.i.attn.c_attn           -> model.layers.i.self_attn.{q,k,v}_proj, its rows cut in three
                                           (q: n_head x head_dim rows; k, v: n_kv_head x head_dim each)
         blocks.i.attn.c_proj           -> model.layers.i.self_attn.o_proj
         blocks.i.mlp.{gate, up, down}  -> model.layers.i.mlp.{gate,up,down}_proj

Layouts: GPT-2's linear layers are Conv1D, which store the weight as (in, out), so ours, nn.Linear's (out, in), are
transposed. Llama's are nn.Linear and keep their layout; its rotary embedding rotates (first half, second half) of
each head with inv_freq = 1 / ROPE_THETA^(2j / head_dim), as ours does, so q and k need no permutation.

Tokenizer: text is encoded with split_special_tokens, as our load_tokenizer does: the string "<|endoftext|>" in
input text is plain text; only code emits the <|endoftext|> id. No BOS or EOS is added to encodings. The one
exception, a chat export: apply_chat_template renders the control tokens as text, so its tokenizer must match them
(split_special_tokens false, as every transformers chat model); the template neutralises special-token strings in
message content as our encoder does (llm/chat.py), and plain text with such strings wants split_special_tokens=True.
"""

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from llm.chat import ChatTokens, chat_template
from llm.config import EOT
from llm.configs.model import PRESETS
from llm.errors import InputError
from llm.fileio import atomic_dir
from llm.model import GPT, NORM_EPS, ROPE_THETA, GPTConfig, tied_aliases
from llm.project import project_root
from llm.tokenizer import load_tokenizer

# The transformers class that computes each preset.
MARKER = ".llm-export.json"  # in every export: what wrote it, so that only an export is ever replaced
TOOL = "python -m stages export-hf"
HF_PRESETS = {"GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama"}
# Parts a class leaves free: zero_init shapes only the initial weights; Llama ties or unties its head
# (tie_word_embeddings). GPT-2 always ties it.
FREE_PARTS = {"GPT2LMHeadModel": {"zero_init"}, "LlamaForCausalLM": {"zero_init", "head"}}
# What each transformers class computes, in our parts: its preset's, less the parts it leaves free.
HF_PARTS = {name: {part: value for part, value in PRESETS[preset].items() if part not in FREE_PARTS[name]}
            for name, preset in HF_PRESETS.items()}


def hf_class(cfg: GPTConfig) -> str:
    """The transformers class that computes exactly what a model of `cfg` does; InputError naming the first part
    it cannot represent otherwise. The positions decide which class is tried."""
    name = next(name for name, parts in HF_PARTS.items() if parts["positions"] == cfg.positions)
    for part, needed in HF_PARTS[name].items():
        if getattr(cfg, part) != needed:
            raise InputError(f"cannot export to transformers: model.{part} is {getattr(cfg, part)!r} (arch "
                             f"{cfg.arch}), and {name} computes only {part} {needed!r}")
    if name == "GPT2LMHeadModel" and cfg.n_kv_head != cfg.n_head:
        raise InputError(f"cannot export to transformers: model.n_kv_head is {cfg.n_kv_head}, and GPT2LMHeadModel "
                         f"has no grouped-query attention (n_kv_head must equal n_head, {cfg.n_head})")
    return name


def check_out(out: Path, keep: list[Path]) -> None:
    """InputError naming `out` unless the export may write it: absent, an empty folder, or an earlier export
    holding only the files its marker lists; never a folder that is or holds a path of `keep`."""
    try:
        _check_out(out, keep)
    except OSError as err:  # a name too long, a parent that is a file, a folder that cannot be read...
        raise _unwritable(out, err) from None


def _unwritable(out: Path, err: OSError) -> InputError:
    return InputError(f"{out}: cannot write it ({err.strerror or err}); choose a --out folder you can write")


def _check_out(out: Path, keep: list[Path]) -> None:
    if out.is_symlink():
        raise InputError(f"{out}: a symbolic link; export-hf writes a real folder and replaces only its own "
                         "exports: choose another --out")
    target = out.resolve()
    for kept in keep:
        if target == kept.resolve() or target in kept.resolve().parents:
            raise InputError(f"{out}: is or holds {kept}, which export-hf must not replace: choose another --out")
    if not out.exists():
        return
    if not out.is_dir():
        raise InputError(f"{out}: a file, not a folder export-hf wrote; it is left as it is: choose another --out")
    present = {entry.name for entry in out.iterdir()}
    if not present:
        return
    written = _exported_files(out / MARKER)
    if written is None:
        raise InputError(f"{out}: a folder export-hf did not write (no valid {MARKER}); it is left as it is: "
                         "remove it yourself or choose another --out")
    extra = sorted(present - written - {MARKER})
    if extra:
        raise InputError(f"{out}: an earlier export holding {extra[0]!r}, which export-hf did not write; it is left "
                         "as it is: remove it yourself or choose another --out")


def _exported_files(marker: Path) -> set[str] | None:
    """The files an export's marker lists, or None when `marker` is not one export-hf wrote."""
    try:
        record = json.loads(marker.read_bytes())
    except (OSError, ValueError):
        return None
    files = record.get("files") if isinstance(record, dict) and record.get("tool") == TOOL else None
    if not isinstance(files, list) or not all(isinstance(name, str) for name in files):
        return None
    return set(files)


def export_hf(model: GPT, tokenizer_path: Path, out: Path, model_dir: Path | None = None) -> None:
    """Write `out` (replaced whole, atomically) as a transformers model folder for `model` and its tokenizer,
    `model_dir` (default: the tokenizer's folder) named in its marker as given (an export is often published: the
    marker tells no more of this machine's folders than the command line did). InputError, before anything is written,
    when `out` is not a folder the export may replace (`check_out`) or cannot be written."""
    model_dir = tokenizer_path.parent if model_dir is None else model_dir
    keep = [Path.cwd(), project_root(), model_dir, tokenizer_path]
    check_out(out, keep)
    cfg = model.config
    target = hf_class(cfg)
    tokenizer = load_tokenizer(tokenizer_path)  # raises InputError without <|endoftext|>
    if tokenizer.get_vocab_size() != cfg.vocab_size:
        raise InputError(f"{tokenizer_path}: {tokenizer.get_vocab_size()} tokens, but the model has "
                         f"vocab_size {cfg.vocab_size}; is this the tokenizer it was trained with?")
    eot_id = tokenizer.token_to_id(EOT)
    chat = ChatTokens.from_tokenizer(tokenizer, tokenizer_path) if ChatTokens.present(tokenizer) else None
    template = None if chat is None else chat_template(chat)
    weights = _our_weights(model)
    if target == "GPT2LMHeadModel":
        config, tensors = _gpt2_config(model, eot_id), _gpt2_tensors(weights, cfg.n_layer)
    else:
        config, tensors = _llama_config(model, eot_id), _llama_tensors(weights, cfg)
    if weights:
        raise ValueError(f"weights with no transformers name: {sorted(weights)}")

    try:
        with atomic_dir(out) as staging:
            _write_json(staging / "config.json", config)
            save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
            eos = eot_id if chat is None else [chat.end, eot_id]  # a tuned model ends its answer with <|end|>
            _write_json(staging / "generation_config.json", {"bos_token_id": eot_id, "eos_token_id": eos})
            shutil.copyfile(tokenizer_path, staging / "tokenizer.json")
            _write_json(staging / "tokenizer_config.json", _tokenizer_config(cfg.block_size, template))
            if template is not None:  # transformers 5 reads this file; 4 reads tokenizer_config.json's copy
                (staging / "chat_template.jinja").write_text(template)
            _write_json(staging / "special_tokens_map.json", {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT})
            files = sorted(entry.name for entry in staging.iterdir())
            _write_json(staging / MARKER, {"tool": TOOL, "model": str(model_dir), "files": files})
            check_out(out, keep)  # again, just before the swap: `out` may have changed while the weights were written
    except OSError as err:  # a disk without room is an InputError already (DiskFull)
        raise _unwritable(out, err) from None


def _our_weights(model: GPT) -> dict[str, torch.Tensor]:
    """Float32 CPU copies of the weights by our names, a tied alias (gpt2's lm_head.weight) left out. Each is a
    contiguous tensor of its own: safetensors refuses tensors that share storage."""
    aliases = tied_aliases(model)
    return {name: tensor.detach().to("cpu", torch.float32).contiguous().clone()
            for name, tensor in model.state_dict().items() if name not in aliases}


def _gpt2_tensors(weights: dict[str, torch.Tensor], n_layer: int) -> dict[str, torch.Tensor]:
    """Pops every entry of `weights` it maps."""
    tensors = {f"transformer.{name}": weights.pop(name) for name in
               ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias")}
    for i in range(n_layer):
        for part in ("ln_1", "ln_2", "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            ours, theirs = f"blocks.{i}.{part}", f"transformer.h.{i}.{part}"
            weight = weights.pop(f"{ours}.weight")
            is_linear = not part.startswith("ln_")
            tensors[f"{theirs}.weight"] = weight.t().contiguous() if is_linear else weight  # Conv1D: (in, out)
            tensors[f"{theirs}.bias"] = weights.pop(f"{ours}.bias")
    return tensors


def _llama_tensors(weights: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """Pops every entry of `weights` it maps. A tied head is not stored: tie_word_embeddings restores it."""
    tensors = {
        "model.embed_tokens.weight": weights.pop("wte.weight"),
        "model.norm.weight": weights.pop("ln_f.weight"),
    }
    if cfg.head == "untied":
        tensors["lm_head.weight"] = weights.pop("lm_head.weight")
    q_rows, kv_rows = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    for i in range(cfg.n_layer):
        ours, theirs = f"blocks.{i}", f"model.layers.{i}"
        # Rows: q, then k, then v. Cloned, as each part is a view into the fused weight.
        fused = weights.pop(f"{ours}.attn.c_attn.weight")
        q, k, v = (part.clone() for part in fused.split([q_rows, kv_rows, kv_rows], dim=0))
        tensors |= {
            f"{theirs}.input_layernorm.weight": weights.pop(f"{ours}.ln_1.weight"),
            f"{theirs}.post_attention_layernorm.weight": weights.pop(f"{ours}.ln_2.weight"),
            f"{theirs}.self_attn.q_proj.weight": q,
            f"{theirs}.self_attn.k_proj.weight": k,
            f"{theirs}.self_attn.v_proj.weight": v,
            f"{theirs}.self_attn.o_proj.weight": weights.pop(f"{ours}.attn.c_proj.weight"),
        }
        for part in ("gate", "up", "down"):
            tensors[f"{theirs}.mlp.{part}_proj.weight"] = weights.pop(f"{ours}.mlp.{part}.weight")
    return tensors


def _common_config(model: GPT, eot_id: int) -> dict[str, Any]:
    return {
        "vocab_size": model.config.vocab_size,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "dtype": "float32",
        "torch_dtype": "float32",  # the name transformers 4 reads; 5 reads dtype
        "use_cache": True,
    }


def _gpt2_config(model: GPT, eot_id: int) -> dict[str, Any]:
    cfg = model.config
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "n_positions": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": cfg.mlp_hidden,
        "activation_function": "gelu_new",  # the tanh approximation, as our MLP's F.gelu(approximate="tanh")
        "layer_norm_epsilon": NORM_EPS,
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        **_common_config(model, eot_id),
    }


def _llama_config(model: GPT, eot_id: int) -> dict[str, Any]:
    cfg = model.config
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.mlp_hidden,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.block_size,
        "rms_norm_eps": NORM_EPS,
        # transformers 5 reads rope_parameters; transformers 4 reads the top-level rope_theta.
        "rope_parameters": {"rope_type": "default", "rope_theta": ROPE_THETA},
        "rope_theta": ROPE_THETA,
        "attention_bias": False,
        "attention_dropout": cfg.dropout,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.head == "tied",
        **_common_config(model, eot_id),
    }


def _tokenizer_config(block_size: int, template: str | None) -> dict[str, Any]:
    """`template`: a chat export's chat template (None: a base model's), which needs special tokens matched in its
    text."""
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",  # the generic class: runs tokenizer.json as it is
        "bos_token": EOT,
        "eos_token": EOT,
        "unk_token": EOT,
        "model_max_length": block_size,
        "add_bos_token": False,
        "add_eos_token": False,
        "split_special_tokens": True,  # as load_tokenizer: "<|endoftext|>" in text is plain text
        "clean_up_tokenization_spaces": False,  # decode(encode(s)) == s
    }
    if template is not None:
        config |= {"split_special_tokens": False, "chat_template": template}
    return config


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
