"""Training arguments: Hugging Face ``TrainingArguments`` plus cardtune's own, from the command
line and/or ``--config recipe.yaml``.

Precedence, lowest first: the dataclass defaults, the demo recipe (only for a ``loader: demo``
model), the ``--config`` file, the command line. Every key, in a file or on the command line,
must name an argument: a misspelt option is an error that names the closest ones.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cardtune.registry.errors import CardError, InputFileError
from cardtune.registry.loader import PACKAGE_ROOT, load_yaml, read_text

RECIPE_DIR = PACKAGE_ROOT / "configs" / "train"
DEMO_RECIPE = RECIPE_DIR / "demo.yaml"


class ArgumentError(ValueError):
    """A training option that does not exist or does not fit with the others. ``options``: the
    options it is about; ``context``: lines to print before it (where values came from)."""

    def __init__(self, message: str, options: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.options = tuple(options)
        self.context: list[str] = []


@dataclass
class ModelArguments:
    model_id: str | None = field(default=None, metadata={"help": "a registered model id (`cardtune list`)"})
    model_path: str | None = field(
        default=None,
        metadata={"help": "a local Hugging Face folder; with --model_id, a local copy of that registered model"},
    )
    cards: list[str] = field(
        default_factory=list, metadata={"help": "extra folders of model cards", "nargs": "*"}
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "run the Python code the model folder ships (auto_map: its tokenizer, processor or model "
                  "classes); read it first. Without it, --model_path's own code is never run, whatever the "
                  "folder's cardtune_card.yaml says (a card of your own --cards folder may still trust it)"},
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={
            "help": "attention kernel: flash_attention_2, sdpa or eager; default flash_attention_2 when CUDA and "
            "flash_attn are present, else sdpa"
        },
    )
    loss_impl: Literal["chunked", "model"] = field(
        default="chunked",
        metadata={"help": "chunked: the training loss from the last hidden states, a chunk of trained positions at a "
                  "time, never the whole logits (where the model's own loss is shown equal at load; else the model's "
                  "own, with a note); model: the model's forward computes it from its full logits"},
    )
    template: str | None = field(
        default=None,
        metadata={"help": "chat template for this run: own, plain (projector pretraining), declarative, "
                  "or a Jinja file that replaces the model's own"},
    )
    cpu_threads: int | None = field(
        default=None,
        metadata={"help": "torch threads on CPU (default: torch's choice); 1 is fastest for tiny models, "
                  "whose matrices are too small to split between cores"},
    )


@dataclass
class DataArguments:
    data_path: str | None = field(
        default=None,
        metadata={"help": "training data: a LLaVA/OpenAI JSON or JSONL file, 'a.json:0.7,b.json:0.3', or a mix YAML",
                  "aliases": ["--data"]},
    )
    eval_data_path: str | None = field(default=None, metadata={"help": "evaluation data (eval loss)"})
    image_folder: str | None = field(default=None, metadata={"help": "folder that image paths are relative to"})
    video_folder: str | None = field(default=None, metadata={"help": "folder that video paths are relative to"})
    allow_absolute_paths: bool = field(
        default=False,
        metadata={"help": "accept absolute media paths outside --image_folder / --video_folder",
                  "aliases": ["--allow-absolute-paths"]},
    )
    max_length: int | None = field(
        default=None,
        metadata={"help": "longest sequence in tokens; longer samples are cut after their media "
                  "(default: samples longer than the model takes are refused, too_long)"},
    )
    bad_sample_policy: Literal["error", "skip"] = field(
        default="error",
        metadata={"help": "error: stop before step 1 and print the data report; skip: drop bad samples, "
                  "count them and write their ids to output_dir"},
    )
    max_skipped_share: float = field(
        default=0.1,
        metadata={"help": "with --bad_sample_policy skip: the largest share of a split's records that may be "
                  "dropped (0.1: 10%%); more stops the run before step 1 (a wrong --image_folder, say)"},
    )
    user_key: str = field(
        default="human", metadata={"help": "LLaVA-format 'from' value of user turns (a mix file sets its own)",
                                   "aliases": ["--user-key"]},
    )
    assistant_key: str = field(
        default="gpt", metadata={"help": "LLaVA-format 'from' value of assistant turns (a mix file sets its own)",
                                 "aliases": ["--assistant-key"]},
    )
    typed_control_tokens: Literal["plain", "keep"] = field(
        default="plain",
        metadata={"help": "control-token strings typed inside a message (<|im_end|>, </s>): plain encodes them as "
                  "the text they are, so data cannot forge turns or end answers early; keep leaves them control "
                  "tokens. Either way the data report counts the samples that have any"},
    )
    group_by_length: bool = field(
        default=False, metadata={"help": "batch samples of similar length together (less padding)"}
    )
    packing: bool = field(default=False, metadata={"help": "pack several samples into one sequence"})
    check_media: Literal["header", "full"] = field(
        default="header",
        metadata={"help": "header: validation reads each image's header (present, an image, under the pixel limit) "
                  "and counts its tokens from its size, pixels are decoded in the DataLoader; full: decode every "
                  "image and run the processor before step 1"},
    )
    max_image_pixels: int | None = field(
        default=None, metadata={"help": "images with more pixels are refused (image_too_large); default 89,478,485"}
    )
    validation_workers: int | None = field(
        default=None, metadata={"help": "processes that validate and encode the data (default: the machine's cores)"}
    )
    data_cache: str | None = field(
        default=None,
        metadata={"help": "folder of the validated-data cache (default $CARDTUNE_DATA_CACHE or $CARDTUNE_CACHE/data); "
                  "none: no cache"},
    )


@dataclass
class TuneArguments:
    method: Literal["sft", "dpo"] = field(
        default="sft",
        metadata={"help": "sft: supervised finetuning, every assistant answer trained; dpo: preference tuning on "
                  "pairs of a chosen and a rejected answer (docs/PREFERENCE.md)"},
    )
    use_lora: bool = field(default=False, metadata={"help": "train the LLM through LoRA adapters"})
    use_vision_lora: bool = field(
        default=False, metadata={"help": "train the vision encoder through LoRA (with --train_vision_encoder)"}
    )
    q_lora: bool = field(default=False, metadata={"help": "QLoRA: 4-bit nf4 base weights (CUDA + bitsandbytes)"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    train_vision_encoder: bool = field(default=False, metadata={"help": "train the vision encoder"})
    train_vision_projector: bool = field(default=True, metadata={"help": "train the vision projector"})
    train_llm: bool = field(default=True, metadata={"help": "train the language model (fully, or via LoRA)"})


@dataclass
class RunArguments:
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "start from step 0 in an output_dir that holds an earlier run: the earlier run is moved "
                  "into output_dir/earlier-run-N (nothing is deleted)"},
    )
    eval_generate: int = field(
        default=0,
        metadata={"help": "at each evaluation and at the end, answer the first N eval samples and log their exact "
                  "match, normalized match and chrF beside the eval loss (eval_exact_match, ...; docs/EVAL.md)"},
    )
    eval_generate_max_new_tokens: int = field(
        default=64, metadata={"help": "with --eval_generate: the longest answer generated, in tokens"}
    )


@dataclass
class PreferenceArguments:
    """``--method dpo`` (docs/PREFERENCE.md): the loss on each pair's sequence log-probabilities."""

    preference_loss: Literal["sigmoid", "robust", "ipo", "simpo"] = field(
        default="sigmoid",
        metadata={"help": "sigmoid: DPO (with --label_smoothing: conservative DPO); robust: rDPO, unbiased under "
                  "--label_smoothing of flipped pairs; ipo: IPO on per-token log-ratios; simpo: SimPO, no reference "
                  "model (length-normalised log-probabilities and a margin --simpo_gamma)"},
    )
    beta: float = field(default=0.1, metadata={"help": "how far the policy may move from the reference (the "
                                                        "rewards' scale; SimPO's is larger, 2 to 2.5)"})
    label_smoothing: float = field(
        default=0.0, metadata={"help": "the share of pairs assumed flipped (sigmoid, robust, simpo), below 0.5"},
    )
    simpo_gamma: float = field(default=0.5, metadata={"help": "SimPO's target margin between the rewards"})
    sft_weight: float = field(
        default=0.0,
        metadata={"help": "weight of a supervised term: each pair's mean negative log-likelihood of its chosen "
                  "answer (RPO, CPO-SimPO); 0: none"},
    )


@dataclass
class MoEArguments:
    """Stage-3 MoE-tuning (docs/MOE.md); a recipe writes them as a ``moe:`` section."""

    moe_layers: str | None = field(
        default=None,
        metadata={"help": "upcycle these decoder layers' FFNs into mixtures of experts: sparse (every other), "
                  "dense (all), first_half, second_half, or indices like 0,2,4; unset: no MoE"},
    )
    moe_num_experts: str = field(
        default="4", metadata={"help": "experts per MoE layer: a number, or one per MoE layer (4,4,8)"}
    )
    moe_top_k: int = field(default=2, metadata={"help": "experts each token is routed to"})
    router_aux_loss_coef: float = field(
        default=0.01, metadata={"help": "weight of the load-balancing loss added to the language-model loss"}
    )
    moe_train: Literal["only_moe", "all", "lora"] = field(
        default="only_moe",
        metadata={"help": "only_moe: only experts and routers, in full; all: what the other flags say, plus "
                  "the routers; lora: LoRA on the experts, routers in full"},
    )
    moe_capacity_factor: float | None = field(
        default=None,
        metadata={"help": "cap each expert at ceil(tokens*top_k/experts*factor) assignments, dropping the rest; "
                  "unset: dropless"},
    )
    moe_eval_capacity_factor: float | None = field(
        default=None, metadata={"help": "the capacity factor in evaluation (default: the training one)"}
    )
    moe_min_capacity: int = field(default=4, metadata={"help": "the least capacity of an expert"})
    moe_use_residual: bool = field(
        default=False, metadata={"help": "a dense copy of the FFN beside the experts, mixed by a learned coefficient"}
    )


ARGUMENT_CLASSES: tuple[type, ...] = (ModelArguments, DataArguments, TuneArguments, RunArguments, MoEArguments,
                                       PreferenceArguments)


@dataclass
class Arguments:
    model: ModelArguments
    data: DataArguments
    tune: TuneArguments
    training: Any  # transformers.TrainingArguments
    config_file: str | None = None
    sources: dict[str, str] = field(default_factory=dict)
    """Where each non-default value came from: ``command line``, the config file, or ``demo recipe``."""
    run: RunArguments = field(default_factory=RunArguments)
    moe: MoEArguments = field(default_factory=MoEArguments)
    not_applied: dict[str, str] = field(default_factory=dict)
    """Keys of the default recipe left out, and why (an explicit value contradicts them)."""
    preference: PreferenceArguments = field(default_factory=PreferenceArguments)

    def to_dict(self) -> dict[str, Any]:
        """Every argument, JSON-serialisable (saved as ``cardtune_args.json``)."""
        out: dict[str, Any] = {}
        for part in (self.model, self.data, self.tune, self.run, self.moe, self.preference):
            out.update(dataclasses.asdict(part))
        out.update(self.training.to_dict())
        out["config"] = self.config_file
        return out


DEMO_SOURCE = "demo recipe"
"""The default recipe's name among the sources: it applies to a ``loader: demo`` model, and an
explicit recipe or flag wins over it, also where they only contradict each other."""
SUPERSEDES = {"num_train_epochs": (("max_steps",), "says how long to train")}
"""An explicit value of the key drops these keys of the default recipe, and why (a step count
would end the epochs asked for)."""


def _parser() -> Any:
    from cardtune.quiet import name_deepspeed_accelerator

    name_deepspeed_accelerator()  # before transformers imports accelerate, which imports deepspeed
    from transformers import HfArgumentParser, TrainingArguments

    parser = HfArgumentParser((*ARGUMENT_CLASSES, TrainingArguments), prog="train.py", allow_abbrev=False)
    parser.add_argument("--config", default=None)

    def error(message: str) -> Any:  # one line, not argparse's usage of every option
        raise ArgumentError(message)

    parser.error = error  # type: ignore[method-assign]
    return parser


def read_recipe(path: str | Path) -> dict[str, Any]:
    """A recipe file's mapping, every key an option and every value of its option's type."""
    from cardtune.training.options import all_options
    from cardtune.training.values import ValueProblem, recipe_value

    file = Path(path)
    if not file.is_file():
        raise ArgumentError(f"--config {path}: no such file")
    try:
        data = load_yaml(read_text(file), str(path))[0] or {}
    except InputFileError as exc:
        raise ArgumentError(str(exc)) from None
    if not isinstance(data, dict):
        raise ArgumentError(f"{path}: a recipe is a mapping of argument names to values")
    if "moe" in data:
        from cardtune.training.moe.spec import MoEError, section_arguments

        try:
            section = section_arguments(data.pop("moe"), str(path))
        except MoEError as exc:
            raise ArgumentError(str(exc)) from None
        both = sorted(set(section) & set(data))
        if both:
            raise ArgumentError(f"{path}: {', '.join(both)} given both flat and in the moe: section")
        data.update(section)
    options = all_options()
    if "config" in data:
        raise ArgumentError(f"{path}: a recipe cannot name another --config")
    for key in list(data):
        if key not in options:
            raise ArgumentError(f"{path}: unknown argument '{key}'{close_names(str(key), set(options))}")
        try:
            data[key] = recipe_value(options[key], data[key])
        except ValueProblem as exc:
            from cardtune.registry.loader import field_location

            raise ArgumentError(f"{field_location(str(path), [key])}: {key}: {exc}") from None
    return data


def demo_recipe(method: Any) -> Path:
    """The demo's own recipe for a training method (the supervised one for a name no method has:
    the parser then says what ``--method`` takes)."""
    from cardtune.training.methods import METHODS

    cls = METHODS.get(method) if isinstance(method, str) else None
    return RECIPE_DIR / (cls.demo_recipe if cls is not None else DEMO_RECIPE.name)


def close_names(name: str, known: set[str]) -> str:
    close = difflib.get_close_matches(name.lstrip("-").replace("-", "_"), sorted(known), n=3, cutoff=0.6)
    return f" (did you mean: {', '.join('--' + c for c in close)}?)" if close else ""


def _is_demo(model_id: str | None, cards: list[str]) -> bool:
    if not model_id:
        return False
    from cardtune.registry import UnknownModelError, get_registry

    try:
        return get_registry(cards).get(model_id).family.loader == "demo"
    except (UnknownModelError, CardError):
        return False  # reported when the model resolves


def parse_arguments(argv: Sequence[str] | None = None) -> Arguments:
    """Parse ``argv`` (default ``sys.argv[1:]``) into the argument groups. ``--help`` and an
    option that does not exist are answered before transformers (and torch) are imported."""
    import sys

    from cardtune.training.options import format_help, given_options

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv[: argv.index("--") if "--" in argv else None]):
        sys.stdout.write(format_help())
        raise SystemExit(0)
    given = given_options(argv)
    config = _last(given.get("config"))
    if "config" in given and not config:
        raise ArgumentError("--config: give a recipe file (configs/train/*.yaml)")
    recipe = read_recipe(config) if config else {}
    model_id = _last(given.get("model_id")) or recipe.get("model_id")
    layers: list[tuple[str, dict[str, Any]]] = []
    if _is_demo(model_id, list(given.get("cards") or recipe.get("cards") or [])):
        method = _last(given.get("method")) or recipe.get("method")
        layers.append((DEMO_SOURCE, read_recipe(demo_recipe(method))))
    if config:
        layers.append((config, recipe))
    not_applied: dict[str, str] = {}
    while True:
        args = _parse_layers(argv, layers, set(given))
        args.not_applied = dict(not_applied)
        try:
            check_arguments(args)
        except ArgumentError as exc:
            dropped = _defaults_in_conflict(exc, args.sources)
            if not dropped:
                exc.context = source_lines(args)
                raise
            for key in dropped:
                not_applied[key] = f"{_because(exc, dropped, args.sources)}: {exc}"
            layers = [(name, {k: v for k, v in values.items() if not (name == DEMO_SOURCE and k in dropped)})
                      for name, values in layers]
            continue
        superseded = {k: f"{given_key} from {_named(args.sources[given_key])} {why}"
                      for given_key, (keys, why) in SUPERSEDES.items()
                      if args.sources.get(given_key) not in (None, DEMO_SOURCE)
                      for k in keys if args.sources.get(k) == DEMO_SOURCE}
        if not superseded:
            return args
        not_applied.update(superseded)
        layers = [(name, {k: v for k, v in values.items() if not (name == DEMO_SOURCE and k in superseded)})
                  for name, values in layers]


def _last(values: list[str] | None) -> str | None:
    return values[-1] if values else None


def _defaults_in_conflict(exc: ArgumentError, sources: dict[str, str]) -> list[str]:
    """The default recipe's keys among the options an error names, when an explicit source
    gave the others: the explicit choice wins, and they are dropped."""
    involved = [o for o in exc.options if o in sources]
    defaults = [o for o in involved if sources[o] == DEMO_SOURCE]
    return defaults if defaults and len(defaults) < len(involved) else []


def _because(exc: ArgumentError, dropped: list[str], sources: dict[str, str]) -> str:
    explicit = [f"{o} from {_named(sources[o])}" for o in exc.options if o in sources and o not in dropped]
    return f"{' and '.join(explicit)} contradict{'s' if len(explicit) == 1 else ''} it"


def _named(source: str) -> str:
    return "the command line" if source == "command line" else source


def source_lines(args: Arguments) -> list[str]:
    """Where each non-default value came from, and what of the default recipe was not applied."""
    lines = []
    for source in sorted(set(args.sources.values())):
        keys = sorted(k for k, v in args.sources.items() if v == source)
        lines.append(f"arguments from {source}: {', '.join(keys)}")
    for key, why in sorted(args.not_applied.items()):
        lines.append(f"arguments from {DEMO_SOURCE}, not applied: {key} ({why})")
    return lines


def _parse_layers(argv: list[str], layers: list[tuple[str, dict[str, Any]]], given: set[str]) -> Arguments:
    """``argv`` over the recipes' values, lowest first; ranges checked before the Trainer's
    arguments are built."""
    from cardtune.training.values import range_problem, shown

    parser = _parser()
    sources: dict[str, str] = {}
    for name, values in layers:
        parser.set_defaults(**values)
        sources.update({k: name for k in values})
    namespace = parser.parse_args(argv)
    sources.update({k: "command line" for k in given if k != "config"})

    values = vars(namespace)
    config_file = values.pop("config")
    for action in parser._actions:  # argparse checks the choices of typed values only, not of a recipe's
        value = values.get(action.dest)
        if action.choices and sources.get(action.dest, "command line") != "command line" and value is not None \
                and value not in action.choices:
            raise ArgumentError(f"{_where(action.dest, sources[action.dest])} {shown(value)}: one of "
                                f"{', '.join(map(str, action.choices))}", (action.dest,))
    for name, value in values.items():
        problem = range_problem(name, value)
        if problem:
            raise ArgumentError(f"{_where(name, sources.get(name))} {shown(value)}: {problem}", (name,))
    model, data, tune, run, moe, preference = (
        cls(**{f.name: values.pop(f.name) for f in dataclasses.fields(cls) if f.init}) for cls in ARGUMENT_CLASSES
    )
    if values.get("output_dir") is None:
        name = model.model_id or (Path(model.model_path).name if model.model_path else "model")
        values["output_dir"] = str(Path("out") / name)
    if "use_cpu" not in sources and _distributed_without_cuda():
        # torchrun / `accelerate launch --num_processes N` on a machine without CUDA: the
        # processes form a gloo group on CPU (accelerate's own MULTI_CPU type needs mpirun).
        values["use_cpu"] = True
        sources["use_cpu"] = "no CUDA in a multi-process launch"
    from transformers import TrainingArguments

    try:
        training = TrainingArguments(**values)
    except ValueError as exc:  # the Trainer's own checks of its arguments (a strategy without steps, ...)
        raise ArgumentError(" ".join(str(exc).split())) from None
    return Arguments(model, data, tune, training, config_file, sources, run, moe, preference=preference)


def _where(name: str, source: str | None) -> str:
    """How a problem names an option's value: ``--name`` typed, or ``FILE:LINE: name:`` in a recipe."""
    from cardtune.registry.loader import field_location

    file = str(DEMO_RECIPE) if source == DEMO_SOURCE else source
    if file is None or not Path(file).is_file():
        return f"--{name}"
    return f"{field_location(file, [name])}: {name}:"


def _distributed_without_cuda() -> bool:
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch

    return not torch.cuda.is_available()


def check_media_folders(args: Arguments) -> None:
    """The media folders exist: checked first thing in a run (a mistyped folder would otherwise
    show up as every media sample failing validation)."""
    d = args.data
    for option, folder in (("--image_folder", d.image_folder), ("--video_folder", d.video_folder)):
        if folder is not None and not Path(folder).is_dir():
            what = "not a folder" if Path(folder).exists() else "no such folder"
            raise ArgumentError(f"{option} {folder}: {what} (media paths in the data are relative to it)")


def resume_requested(value: Any) -> bool:
    """``--resume_from_checkpoint``: anything but unset/false asks for a resume."""
    return value is not None and str(value).lower() not in ("", "false", "no", "none")


def check_arguments(args: Arguments) -> None:
    """Combinations that cannot work, reported before anything loads."""
    m, t = args.model, args.tune
    if m.model_id is None and m.model_path is None:
        raise ArgumentError("give --model_id (a registered id, see `cardtune list`) or --model_path (a local folder)")
    if t.q_lora and not t.use_lora:
        raise ArgumentError("--q_lora trains LoRA adapters over a 4-bit base: add --use_lora", ("q_lora", "use_lora"))
    if t.use_lora and not t.train_llm:
        raise ArgumentError("--use_lora trains the LLM through adapters, but --train_llm is false", ("use_lora", "train_llm"))
    if t.use_vision_lora and not t.train_vision_encoder:
        raise ArgumentError("--use_vision_lora needs --train_vision_encoder", ("use_vision_lora", "train_vision_encoder"))
    if not (t.train_llm or t.train_vision_encoder or t.train_vision_projector):
        raise ArgumentError("nothing to train: --train_llm, --train_vision_encoder and --train_vision_projector are all false",
                            ("train_llm", "train_vision_encoder", "train_vision_projector"))
    d = args.data
    if d.group_by_length and d.packing:
        raise ArgumentError("--group_by_length and --packing are alternatives; choose one", ("group_by_length", "packing"))
    if not 0 <= d.max_skipped_share <= 1:
        raise ArgumentError(f"--max_skipped_share {d.max_skipped_share}: a share between 0 and 1 (0.1: 10%)")
    if args.run.eval_generate < 0 or args.run.eval_generate_max_new_tokens < 1:
        raise ArgumentError("--eval_generate N: N >= 0 samples, and --eval_generate_max_new_tokens >= 1")
    if args.run.overwrite_output_dir and resume_requested(args.training.resume_from_checkpoint):
        raise ArgumentError("--overwrite_output_dir starts over, --resume_from_checkpoint continues: choose one",
                            ("overwrite_output_dir", "resume_from_checkpoint"))
    check_moe_arguments(args)
    check_method_arguments(args)


def check_method_arguments(args: Arguments) -> None:
    """A method's own options given to another method, and what the method cannot train."""
    from cardtune.training.methods import METHODS

    method = args.tune.method
    foreign = {option: name for name, cls in METHODS.items() if name != method for option in cls.options
               if option in args.sources}
    if foreign:
        names = ", ".join(f"--{o}" for o in foreign)
        owners = " and ".join(f"--method {m}" for m in dict.fromkeys(foreign.values()))
        raise ArgumentError(f"{names}: options of {owners}, but this run's method is {method}", (*foreign, "method"))
    METHODS[method]().check(args)


def check_moe_arguments(args: Arguments) -> None:
    from cardtune.training.moe.spec import MoEError, parse_layers, parse_num_experts

    moe, t = args.moe, args.tune
    given = sorted(f.name for f in dataclasses.fields(MoEArguments) if f.name in args.sources)
    if moe.moe_layers is None:
        if given:
            raise ArgumentError(f"{', '.join('--' + g for g in given)}: MoE options, but no --moe_layers "
                                "(sparse, dense, first_half, second_half or indices) says which layers")
        return
    try:
        parse_layers(moe.moe_layers)
        counts = parse_num_experts(moe.moe_num_experts)
    except MoEError as exc:
        raise ArgumentError(str(exc)) from None
    if not 1 <= moe.moe_top_k <= min(counts):
        raise ArgumentError(f"--moe_top_k {moe.moe_top_k}: between 1 and the experts of a layer ({min(counts)})")
    if moe.router_aux_loss_coef < 0:
        raise ArgumentError(f"--router_aux_loss_coef {moe.router_aux_loss_coef}: must be >= 0")
    for name in ("moe_capacity_factor", "moe_eval_capacity_factor"):
        value = getattr(moe, name)
        if value is not None and value <= 0:
            raise ArgumentError(f"--{name} {value}: must be > 0 (unset for dropless routing)")
    if moe.moe_eval_capacity_factor is not None and moe.moe_capacity_factor is None:
        raise ArgumentError("--moe_eval_capacity_factor without --moe_capacity_factor: training routes dropless")
    if t.q_lora:
        raise ArgumentError("--q_lora with --moe_layers: upcycling copies 16-bit FFNs into experts; "
                            "4-bit experts are not supported", ("q_lora", "moe_layers"))
    if moe.moe_train == "only_moe" and t.use_lora:
        raise ArgumentError("--moe_train only_moe trains the experts and routers in full; for adapters use "
                            "--moe_train lora (experts) or --moe_train all --use_lora (attention and experts)",
                            ("moe_train", "use_lora"))
    if moe.moe_train == "all" and not t.train_llm:
        raise ArgumentError("--moe_train all with --train_llm false: the experts are part of the LLM",
                            ("moe_train", "train_llm"))

