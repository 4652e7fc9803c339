"""Hugging Face export: transformers loads the folder offline and computes what our model and tokenizer do."""

import dataclasses
import json
import shutil
import socket
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer, models
from transformers import AutoModelForCausalLM, AutoTokenizer

from llm.config import EOT
from llm.configs.model import PRESETS
from llm.errors import InputError
from llm.export import HF_PARTS, HF_PRESETS, MARKER, export_hf, hf_class
from llm.generate import generate
from llm.model import GPTConfig
from llm.model_io import load_model_dir
from tests.conftest import make_model_dir, run_stage

TEXT = ("Hello, world!  Two  spaces,\n\nblank lines\tand tabs. 天地玄黄 東京は日本の首都です。 "
        "في البدء كانت الكلمة. सत्यमेव जयते। Emoji 🎭👩‍💻🇬🇧, accents: Ça va, naïve, e\u0301, Größe.\n")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # the env is read once, at import

    def no_network(*args, **kwargs):
        raise AssertionError("the export must load without the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)


@pytest.fixture(params=["gpt2", "llama", "llama-gqa-tied"])
def exported(request, tmp_path, sample_tokenizer_path):
    """(our model, our tokenizer, the exported folder) for a tiny model whose every weight is perturbed off its
    init (biases and norm weights included), so that a tensor mapped wrongly changes the logits. llama-gqa-tied:
    llama with one key/value head for its two query heads and the head tied to the embedding."""
    arch, *variant = request.param.split("-", 1)
    parts = {"n_kv_head": 1, "head": "tied"} if variant else {}
    model_dir = make_model_dir(tmp_path / "model", sample_tokenizer_path, arch=arch, block_size=64, **parts)
    model, tokenizer = load_model_dir(model_dir)
    out = tmp_path / "hf"
    export_hf(model, model_dir / "tokenizer.json", out)
    return model.eval(), tokenizer, out


def load_hf(out):
    hf, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return hf.eval()


@torch.no_grad()
def test_transformers_computes_our_logits(exported):
    model, _, out = exported
    hf = load_hf(out)
    assert type(hf).__name__ == {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}[model.config.arch]
    assert hf.dtype == torch.float32
    torch.manual_seed(0)
    idx = torch.randint(0, model.config.vocab_size, (2, model.config.block_size))  # the full window
    torch.testing.assert_close(hf(idx).logits, model(idx)[0], atol=1e-4, rtol=0)


def test_transformers_greedy_generation_equals_ours(exported):
    model, tokenizer, out = exported
    hf = load_hf(out)
    eot_id = tokenizer.token_to_id(EOT)
    prompt = tokenizer.encode("To be, or not to be").ids
    ours = list(generate(model, prompt, 20, eot_id=eot_id))  # stops after <|endoftext|>, as generate does
    input_ids = torch.tensor([prompt])
    theirs = hf.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=20, do_sample=False,
                         eos_token_id=eot_id, pad_token_id=eot_id)
    assert theirs[0, len(prompt):].tolist() == ours
    assert len(set(ours)) > 3, "a degenerate model would make this comparison weak"


def test_transformers_tokenizer_encodes_and_decodes_as_ours(exported):
    model, tokenizer, out = exported
    hf_tokenizer = AutoTokenizer.from_pretrained(out)
    eot_id = tokenizer.token_to_id(EOT)
    for text in (TEXT, f"a literal {EOT} in text is text"):
        ids = hf_tokenizer(text)["input_ids"]  # with its default add_special_tokens=True: no BOS is added
        assert ids == tokenizer.encode(text).ids
        assert hf_tokenizer.decode(ids) == text
    assert eot_id not in hf_tokenizer(EOT)["input_ids"]  # only code emits <|endoftext|>, as in our tokenizer
    assert hf_tokenizer.bos_token == hf_tokenizer.eos_token == EOT
    assert hf_tokenizer.bos_token_id == hf_tokenizer.eos_token_id == eot_id
    assert hf_tokenizer.model_max_length == model.config.block_size


def test_weights_file_and_configs(exported):
    model, tokenizer, out = exported
    with safe_open(out / "model.safetensors", framework="pt") as weights:
        assert weights.metadata() == {"format": "pt"}
        names = set(weights.keys())
        assert {weights.get_tensor(name).dtype for name in names} == {torch.float32}
    config = json.loads((out / "config.json").read_text())
    eot_id = tokenizer.token_to_id(EOT)
    assert config["bos_token_id"] == config["eos_token_id"] == eot_id
    if model.config.arch == "gpt2":
        assert "lm_head.weight" not in names and config["tie_word_embeddings"]  # restored from wte
        assert len(names) == 4 + 12 * model.config.n_layer
    else:
        tied = model.config.head == "tied"
        assert ("lm_head.weight" in names) != tied and config["tie_word_embeddings"] == tied
        assert config["num_key_value_heads"] == model.config.n_kv_head
        assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 10_000.0}
        assert len(names) == 2 + (not tied) + 9 * model.config.n_layer
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["bos_token_id"] == generation["eos_token_id"] == eot_id


@pytest.mark.parametrize(("hf_name", "preset"), HF_PRESETS.items())
def test_each_transformers_class_computes_the_parts_of_its_preset(hf_name, preset):
    """What export needs of a class is its preset's parts (llm.config.PRESETS), less those the class leaves
    free: a model of the preset exports to it, whatever its zero_init (and, for Llama, its head)."""
    assert HF_PARTS[hf_name].items() <= PRESETS[preset].items()
    free = set(PRESETS[preset]) - set(HF_PARTS[hf_name])
    assert free == ({"zero_init"} if hf_name == "GPT2LMHeadModel" else {"zero_init", "head"})
    cfg = GPTConfig(arch=preset, n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=300)
    assert hf_class(cfg) == hf_name
    for part in free:
        choices = {"zero_init": [True, False], "head": ["tied", "untied"]}[part]
        for value in choices:
            assert hf_class(dataclasses.replace(cfg, **{part: value})) == hf_name
    with pytest.raises(InputError):
        hf_class(GPTConfig(arch="modern", n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=300))


def test_export_replaces_the_folder_whole(tmp_path, sample_tokenizer_path):
    model, _ = load_model_dir(make_model_dir(tmp_path / "model", sample_tokenizer_path))
    out = tmp_path / "hf"
    export_hf(model, sample_tokenizer_path, out)
    # An earlier export that wrote a file this one does not (its marker lists it): gone after the next export.
    marker = json.loads((out / MARKER).read_text())
    (out / MARKER).write_text(json.dumps({**marker, "files": [*marker["files"], "stale.bin"]}))
    (out / "stale.bin").write_text("from an earlier export")
    export_hf(model, sample_tokenizer_path, out)
    assert sorted(p.name for p in out.iterdir()) == [
        MARKER, "config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
        "tokenizer.json", "tokenizer_config.json",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "model", "tokenizer.json"]  # no staging left


def test_a_tokenizer_without_endoftext_is_an_input_error(tmp_path, sample_tokenizer_path):
    model, _ = load_model_dir(make_model_dir(tmp_path / "model", sample_tokenizer_path))
    no_eot = tmp_path / "no_eot.json"
    no_eot.write_text(Tokenizer(models.BPE()).to_str())
    with pytest.raises(InputError, match=EOT):
        export_hf(model, no_eot, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize(("parts", "named"), [
    ({"arch": "modern"}, "model.norm_gain"),  # the first of its parts neither class computes
    ({"arch": "llama", "mlp": "relu2"}, "model.mlp"),
    ({"arch": "llama", "qk_norm": True}, "model.qk_norm"),
    ({"arch": "llama", "logit_softcap": 30.0}, "model.logit_softcap"),
    ({"arch": "llama", "token_shift": True}, "model.token_shift"),
    ({"arch": "gpt2", "head": "untied"}, "model.head"),
    ({"arch": "gpt2", "n_kv_head": 1}, "model.n_kv_head"),
])
def test_a_model_transformers_cannot_compute_is_refused_naming_the_part(tmp_path, sample_tokenizer_path, parts,
                                                                        named):
    model, _ = load_model_dir(make_model_dir(tmp_path / "model", sample_tokenizer_path, **parts))
    with pytest.raises(InputError, match=named.replace(".", r"\.")):
        export_hf(model, sample_tokenizer_path, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_export_hf_command_writes_a_loadable_folder(tmp_path, tiny_model_dir):
    out = tmp_path / "hf"
    result = run_stage(tmp_path, "export-hf", "--model", tiny_model_dir, "--out", out)
    assert result.returncode == 0, result.stderr
    hf = load_hf(out)
    assert type(hf).__name__ == "GPT2LMHeadModel"
    assert AutoTokenizer.from_pretrained(out).eos_token == EOT

    missing = run_stage(tmp_path, "export-hf", "--model", tmp_path / "nope", "--out", tmp_path / "hf2")
    assert missing.returncode == 2 and "config.json" in missing.stderr
    assert not (tmp_path / "hf2").exists()


# --- what --out may replace: only an earlier export, whole ----------------------------------------------------

def tree(folder):
    """Every path under `folder` with its bytes (None for a folder): what a refused export must leave as it was."""
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes()
            for p in sorted(folder.rglob("*")) if not p.is_symlink()}


def hostile_targets(work, model_dir):
    """(name, --out) pairs export-hf must refuse, each set up under `work`, the command's working directory and a
    project (dvc.yaml, params.yaml, .git/, .dvc/, data/)."""
    (work / "user").mkdir()
    (work / "user" / "thesis.tex").write_text("years of work")
    (work / "plain.txt").write_text("a file")
    (work / "link").symlink_to(work / "user")
    earlier = work / "earlier"
    export_hf(load_model_dir(model_dir)[0], model_dir / "tokenizer.json", earlier)
    with_extra = work / "with_extra"
    shutil.copytree(earlier, with_extra)
    (with_extra / "README.md").write_text("the user's model card")
    with_git = work / "with_git"
    shutil.copytree(earlier, with_git)
    (with_git / ".git").mkdir()
    forged = work / "forged"
    shutil.copytree(earlier, forged)
    (forged / MARKER).write_text("{not json")
    return [("a folder of the user's files", work / "user"), ("a plain file", work / "plain.txt"),
            ("a symbolic link", work / "link"), ("the project folder", work), ("the working directory", Path(".")),
            ("above the project", work.parent), ("models/", model_dir.parent), ("the model folder", model_dir),
            ("data/", work / "data"), ("an export the user added a file to", with_extra),
            ("an export holding a git repository", with_git), ("a damaged marker", forged),
            ("the tokenizer file", model_dir / "tokenizer.json")]


def test_export_hf_refuses_every_target_it_did_not_write_and_changes_nothing(tmp_path, sample_tokenizer_path):
    work = tmp_path / "project"
    work.mkdir()
    for name in ("dvc.yaml", "params.yaml"):
        (work / name).write_text("")
    (work / ".git").mkdir()
    (work / ".dvc").mkdir()
    (work / "data").mkdir()
    (work / "data" / "corpus.txt").write_text("the corpus")
    model_dir = make_model_dir(work / "models" / "final", sample_tokenizer_path)
    targets = hostile_targets(work, model_dir)
    before = tree(tmp_path)
    for name, out in targets:
        result = run_stage(work, "export-hf", "--model", model_dir, "--out", out)
        assert result.returncode == 2, (name, result.stderr)
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, (name, result.stderr)
        assert str(out) in result.stderr or str(out.resolve()) in result.stderr, (name, result.stderr)
        assert tree(tmp_path) == before, name


def test_export_hf_replaces_an_earlier_export_and_writes_an_empty_or_new_folder(tmp_path, tiny_model_dir):
    for out in (tmp_path / "new" / "hf", tmp_path / "empty"):
        if out.name == "empty":
            out.mkdir()
        for _ in range(2):  # the second run replaces the first's export
            result = run_stage(tmp_path, "export-hf", "--model", tiny_model_dir, "--out", out)
            assert result.returncode == 0, result.stderr
            marker = json.loads((out / MARKER).read_text())
            assert marker["model"] == str(tiny_model_dir) and "export-hf" in marker["tool"]
            assert sorted(marker["files"]) == sorted(p.name for p in out.iterdir() if p.name != MARKER)


def test_a_failed_export_leaves_the_earlier_export_whole(tmp_path, sample_tokenizer_path, monkeypatch):
    model, _ = load_model_dir(make_model_dir(tmp_path / "model", sample_tokenizer_path))
    out = tmp_path / "hf"
    export_hf(model, sample_tokenizer_path, out)
    before = tree(out)

    def broken(*args, **kwargs):
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr("llm.export.save_file", broken)
    with pytest.raises(RuntimeError):
        export_hf(model, sample_tokenizer_path, out)
    assert tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "model", "tokenizer.json"]  # no staging left


def test_a_file_put_into_out_during_the_export_is_kept(tmp_path, sample_tokenizer_path, monkeypatch):
    """The check is made again just before the swap: what the user put into --out while the weights were being
    written (an export of a big model takes minutes) is not replaced."""
    model, _ = load_model_dir(make_model_dir(tmp_path / "model", sample_tokenizer_path))
    out = tmp_path / "hf"
    export_hf(model, sample_tokenizer_path, out)

    def save_while_the_user_writes(*args, **kwargs):
        (out / "notes.txt").write_text("written during the export")
        save_file(*args, **kwargs)

    monkeypatch.setattr("llm.export.save_file", save_while_the_user_writes)
    with pytest.raises(InputError, match="notes.txt"):
        export_hf(model, sample_tokenizer_path, out)
    assert (out / "notes.txt").read_text() == "written during the export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "model", "tokenizer.json"]  # no staging left


@pytest.mark.parametrize("where", ["under a file", "under /proc", "permission denied"])
def test_an_unwritable_out_is_one_line(tmp_path, tiny_model_dir, where, monkeypatch):
    (tmp_path / "plain").write_text("a file")
    out = tmp_path / "plain" / "hf" if where == "under a file" else Path("/proc/llm-export-test/hf")
    if where == "permission denied":  # what a folder without write permission gives (the tests run as root)
        out = tmp_path / "hf"

        def denied(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr("tempfile.mkdtemp", denied)
    result = run_stage(tmp_path, "export-hf", "--model", tiny_model_dir, "--out", out)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and str(out) in result.stderr, result.stderr
    assert (tmp_path / "plain").read_text() == "a file"


# --- a tuned model's export: the chat template ---------------------------------------------------------------

CONVERSATIONS = [  # each ends with an assistant message; the generation prompt is tested on the rest
    [{"role": "user", "content": "Who speaks first?"}, {"role": "assistant", "content": "HAMLET."}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Who speaks first?"},
     {"role": "assistant", "content": "HAMLET."}],
    [{"role": "system", "content": f"Typed: {EOT} <|system|>"},
     {"role": "user", "content": "What does <|user|> mean, or <|end|>, or <|use, or |>?\n"},
     {"role": "assistant", "content": " <|assistant|>: a <<|end|>> token. 天地 🎭 e\u0301\n\n"},
     {"role": "user", "content": "And <\u2060|user|> (already neutral), <|<|end|>|>, <|endoftext"},
     {"role": "assistant", "content": "\t<|endoftext|>\n"}],
    [{"role": "user", "content": TEXT}, {"role": "assistant", "content": TEXT}],
]


@pytest.fixture
def chat_exported(tmp_path, chat_tokenizer_path):
    """(our model, our tokenizer, its ChatTokens, the exported folder) for a model whose tokenizer has the chat
    tokens: the export of a tuned model."""
    from llm.chat import ChatTokens

    model_dir = make_model_dir(tmp_path / "model", chat_tokenizer_path, block_size=128)
    model, tokenizer = load_model_dir(model_dir)
    out = tmp_path / "hf"
    export_hf(model, model_dir / "tokenizer.json", out)
    return model.eval(), tokenizer, ChatTokens.from_tokenizer(tokenizer, chat_tokenizer_path), out


def test_apply_chat_template_gives_our_ids_and_our_loss_mask(chat_exported):
    """transformers' assistant_masks[i] equals our trained[i], position for position: both say whether token i
    is an assistant's (content or closing <|end|>). The loss shifts them alike: position i's label is
    ids[i + 1] where token i + 1 is marked, else -1 (ignored); inputs_and_targets builds exactly that."""
    from llm.chat import Conversation, Message, encode_conversation, encode_prompt

    _, tokenizer, tokens, out = chat_exported
    hf_tokenizer = AutoTokenizer.from_pretrained(out)
    for messages in CONVERSATIONS:
        conversation = Conversation(tuple(Message(m["role"], m["content"]) for m in messages))
        ours = encode_conversation(tokenizer, tokens, conversation)
        theirs = hf_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                  return_assistant_tokens_mask=True)
        assert theirs["input_ids"] == ours.ids
        assert theirs["assistant_masks"] == [int(trained) for trained in ours.trained]
        _, targets = ours.inputs_and_targets()
        ids, mask = theirs["input_ids"], theirs["assistant_masks"]
        assert targets == [ids[i + 1] if mask[i + 1] else -1 for i in range(len(ids) - 1)]
        assert hf_tokenizer.apply_chat_template(messages, return_dict=False) == ours.ids

        so_far = conversation.messages[:-1]
        assert hf_tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, return_dict=False) \
            == encode_prompt(tokenizer, tokens, so_far)
        assert hf_tokenizer.apply_chat_template(messages[:-1], return_dict=False) \
            == encode_conversation(tokenizer, tokens, Conversation(so_far)).ids
        control = tokens.control_ids
        assert sum(t in control for t in ours.ids) == 1 + 2 * len(messages)  # typed strings stayed text


def test_a_chat_export_writes_its_template_and_ends_turns_at_end(chat_exported):
    from llm.chat import chat_template

    _, tokenizer, tokens, out = chat_exported
    template = (out / "chat_template.jinja").read_text()
    assert template == chat_template(tokens)
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["chat_template"] == template and config["split_special_tokens"] is False
    assert "chat_template.jinja" in json.loads((out / MARKER).read_text())["files"]
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tokens.end, tokens.eot]
    hf_tokenizer = AutoTokenizer.from_pretrained(out)
    # Plain text encodes as ours: as is without special-token strings, with split_special_tokens=True with them.
    assert hf_tokenizer(TEXT)["input_ids"] == tokenizer.encode(TEXT).ids
    typed = f"a literal {EOT} and <|user|> in text is text"
    assert hf_tokenizer(typed, split_special_tokens=True)["input_ids"] == tokenizer.encode(typed).ids
    with pytest.raises(Exception, match="roles are system, user, assistant"):
        hf_tokenizer.apply_chat_template([{"role": "tool", "content": "x"}])


@torch.no_grad()
def test_a_chat_export_computes_our_logits_on_a_conversation(chat_exported):
    from llm.chat import Conversation, Message, encode_conversation

    model, tokenizer, tokens, out = chat_exported
    conversation = Conversation(tuple(Message(m["role"], m["content"]) for m in CONVERSATIONS[1]))
    idx = torch.tensor([encode_conversation(tokenizer, tokens, conversation).ids])
    torch.testing.assert_close(load_hf(out)(idx).logits, model(idx)[0], atol=1e-4, rtol=0)
