"""SLED, DoLa and greedy inside vLLM (``pip install "sled-ext[vllm]"``), per request:
``SamplingParams(extra_args={"sled": {"method": "sled", "evolution_rate": 2.0, ...}})``, through
the OpenAI-compatible server as ``extra_body={"vllm_xargs": {"sled": json.dumps({...})}}`` (the
server's ``vllm_xargs`` values cannot be objects, so there the settings come as a JSON string).
The settings are those of :func:`sled_ext.generate`; a request without them decodes as stock
vLLM.

Three pieces, all found through entry points (pyproject.toml), so no config is edited:

- :func:`register` (``vllm.general_plugins``, every vLLM process) replaces the model classes of
  :data:`ARCHITECTURES` with subclasses that also keep every layer's residual stream at the rows
  being sampled, and makes request validation check the ``sled`` settings against the model (a bad
  one is an HTTP 400).
- :class:`SledRequests` (``vllm.logits_processors``) tracks which request of the batch asked for
  what. vLLM updates it before each forward; it never changes logits itself.
- :class:`SledModel`'s ``compute_logits`` then replaces those requests' rows with the method's
  scores (``decoding.StepScorer``, the op or ``distributed.evolve_topk`` under tensor parallelism),
  before any of vLLM's processors, penalties and sampling, which apply after as to any logits.

Imported by vLLM only; ``import sled_ext`` does not import it.
"""
from __future__ import annotations

import importlib
import json
import math

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from .decoding import StepScorer
from .method import Method
from .models import UnsupportedModel, VocabShard, candidate_layers

# vLLM architecture name -> the vLLM module holding its model class.
ARCHITECTURES = {
    "LlamaForCausalLM": "vllm.model_executor.models.llama",
    "MistralForCausalLM": "vllm.model_executor.models.mistral",
    "Qwen2ForCausalLM": "vllm.model_executor.models.qwen2",
    "Qwen3ForCausalLM": "vllm.model_executor.models.qwen3",
    "Gemma3ForCausalLM": "vllm.model_executor.models.gemma3",
}
SETTINGS = ("method", "evolution_rate", "evolution_scale", "evolution_lower_bound", "iterations",
            "layers", "premature_norm", "relative_top")

_registered = False
# id(VllmConfig) -> that engine's SledRequests: the model and the logits processors of one model
# runner share its config object, and nothing else.
_batches: dict[int, SledRequests] = {}


def request_method(params: SamplingParams) -> Method | None:
    """The request's ``extra_args["sled"]`` as a :class:`Method`; None when it has none. Raises
    ``ValueError`` naming the setting for anything that is not a valid setting whatever the
    model."""
    settings = (params.extra_args or {}).get("sled")
    if settings is None:
        return None
    if isinstance(settings, str):
        try:
            settings = json.loads(settings)
        except json.JSONDecodeError as error:
            raise ValueError(f'"sled" is not valid JSON ({error}): {settings!r}') from None
    if not isinstance(settings, dict):
        raise ValueError(f'"sled" must be an object of settings ({", ".join(SETTINGS)}) or its '
                         f"JSON text, got {settings!r}")
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise ValueError(f"unknown sled setting(s) {unknown}; known: {', '.join(SETTINGS)}")

    def number(name, kind, low=None):
        value = settings.get(name, getattr(Method, name))
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(
                value) or (kind is int and not float(value).is_integer()):
            raise ValueError(f"sled setting {name!r} must be a finite {kind.__name__}, "
                             f"got {value!r}")
        if low is not None and value < low:
            raise ValueError(f"sled setting {name!r} must be >= {low}, got {value!r}")
        return kind(value)

    layers = settings.get("layers", "all")
    if isinstance(layers, list):
        layers = tuple(layers)  # hashable: requests with equal settings share one op call
    premature_norm = settings.get("premature_norm", False)
    if not isinstance(premature_norm, bool):
        raise ValueError(f"sled setting 'premature_norm' must be true or false, "
                         f"got {premature_norm!r}")
    relative_top = number("relative_top", float)
    if not 0 < relative_top <= 1:
        raise ValueError(f"sled setting 'relative_top' must be in (0, 1], got {relative_top}")
    return Method(settings.get("method", "sled"), evolution_rate=number("evolution_rate", float),
                  evolution_scale=number("evolution_scale", int, 1),
                  evolution_lower_bound=number("evolution_lower_bound", float),
                  iterations=number("iterations", int, 1), layers=layers,
                  premature_norm=premature_norm, relative_top=relative_top)


def check_for_model(method: Method, vllm_config) -> None:
    """Raises ``ValueError`` when ``method`` cannot run on the served model."""
    model_config = vllm_config.model_config
    architecture = model_config.architectures[0]
    if architecture not in ARCHITECTURES:
        raise ValueError(f"SLED is not available for {architecture}; the sled-ext vLLM plugin "
                         f"supports {', '.join(ARCHITECTURES)}")
    if vllm_config.speculative_config is not None:
        raise ValueError("SLED requests are not supported with speculative decoding")
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        raise ValueError("SLED requests are not supported with pipeline parallelism")
    if not _captures_when_compiled(architecture) and _compiled(vllm_config):
        raise ValueError(f"SLED on {architecture} needs the engine started with enforce_eager "
                         "(--enforce-eager): its vLLM model has no hidden-state outputs for "
                         "compiled graphs")
    if method.name == "greedy":
        return
    vocab = model_config.get_vocab_size()
    if method.name == "sled" and method.evolution_scale > vocab:
        raise ValueError(f"sled setting 'evolution_scale' (k) must be in [1, V] = [1, {vocab}], "
                         f"got {method.evolution_scale}")
    candidate_layers(method.layers, model_config.hf_text_config.num_hidden_layers)


def _captures_when_compiled(architecture: str) -> bool:
    # Models built on vLLM's EagleModelMixin return the residual streams as graph outputs; the
    # others are read by forward hooks, which only run eagerly.
    return architecture != "Gemma3ForCausalLM"


def _compiled(vllm_config) -> bool:
    from vllm.config import CompilationMode
    return vllm_config.compilation_config.mode != CompilationMode.NONE


def register() -> None:
    """The ``vllm.general_plugins`` entry point; vLLM calls it in every process."""
    global _registered
    from vllm import ModelRegistry
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.input_processor import InputProcessor

    for architecture in ARCHITECTURES:
        ModelRegistry.register_model(architecture, f"{__name__}:Sled{architecture}")
    if not _registered:
        # Request validation with the model at hand (the vocabulary size, the layer count), so a
        # bad setting is refused before it reaches the engine: a 400 from the server.
        validate = InputProcessor._validate_params

        def validate_with_sled(self, params, supported_tasks):
            if isinstance(params, SamplingParams):
                try:
                    method = request_method(params)
                    if method is not None:
                        check_for_model(method, self.vllm_config)
                except ValueError as error:
                    raise VLLMValidationError(str(error)) from None
            return validate(self, params, supported_tasks)

        InputProcessor._validate_params = validate_with_sled
    _registered = True


class SledRequests(LogitsProcessor):
    """Which request of the persistent batch asked for SLED or DoLa, by batch index (the row of
    the logits); vLLM keeps it current before every forward. Leaves the logits alone."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams):
        if request_method(sampling_params) is not None and not _registered:
            raise ValueError("a sled request, but the sled-ext vLLM plugin is not loaded "
                             "(VLLM_PLUGINS excludes 'sled'?)")

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.methods: dict[int, Method] = {}
        _batches[id(vllm_config)] = self

    def update_state(self, batch_update: BatchUpdate | None):
        def method_of(params, _prompt_ids, _output_ids):
            method = request_method(params)
            return None if method is None or method.name == "greedy" else method
        process_dict_updates(self.methods, batch_update, method_of)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def is_argmax_invariant(self) -> bool:
        return True  # apply() changes nothing


class SledModel:
    """Mixed in before a vLLM causal-LM class: ``forward`` keeps the residual stream entering
    each decoder block (as Hugging Face's ``hidden_states[l]``: layer 0 is the embedding output)
    at the last scheduled token of each request, the rows ``compute_logits`` scores."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._config_key = id(vllm_config)
        self._num_layers = vllm_config.model_config.hf_text_config.num_hidden_layers
        self._scorers: dict[Method, StepScorer] = {}
        self._sampled = None          # the rows being sampled in the current forward
        self._streams = None          # [L, P, H] of the last forward, or None
        self._hooked: list | None = None
        layers = tuple(range(self._num_layers))
        if hasattr(self.model, "_set_aux_hidden_state_layers"):  # vLLM's EagleModelMixin
            self.model._set_aux_hidden_state_layers(layers)
        elif not _compiled(vllm_config):
            self._hooked = []
            for block in self.model.layers:
                block.register_forward_pre_hook(self._keep_stream)
        # else: compiled without stream outputs; check_for_model refuses SLED requests.

    def _keep_stream(self, _block, args):
        _positions, hidden, residual = args[:3]
        if self._sampled is not None:
            stream = hidden if residual is None else hidden + residual
            self._hooked.append(stream[self._sampled])

    def forward(self, *args, **kwargs):
        self._sampled = _sampled_rows()
        if self._hooked is not None:
            self._hooked.clear()
        output = super().forward(*args, **kwargs)
        if isinstance(output, tuple):  # (final hidden, residual streams)
            output, streams = output
            self._streams = (None if self._sampled is None
                             else torch.stack([s[self._sampled] for s in streams]))
        elif self._hooked is not None and self._sampled is not None:
            self._streams = torch.stack(self._hooked)
        else:
            self._streams = None
        return output

    def compute_logits(self, hidden_states: torch.Tensor):
        logits = super().compute_logits(hidden_states)
        requests = _batches.get(self._config_key)
        if logits is None or requests is None or not requests.methods:
            return logits
        positions = hidden_states.shape[0]
        if self._streams is None or self._streams.shape[1] < positions:
            raise RuntimeError("SLED: no residual streams for the rows being sampled "
                               "(speculative decoding or an unsupported runner?)")
        streams = self._streams[:, :positions]  # a graph-padded batch has spare rows last
        logits = logits.float()
        by_method: dict[Method, list[int]] = {}
        for index, method in requests.methods.items():
            by_method.setdefault(method, []).append(index)
        for method, indices in by_method.items():
            scorer = self._scorer(method)
            rows = torch.tensor(indices, device=hidden_states.device)
            premature = streams[scorer.layers][:, rows]
            if method.premature_norm:
                premature = self.model.norm(premature.flatten(0, 1)).view_as(premature)
            stacked = torch.cat([premature, hidden_states[rows][None]])
            logits[rows] = scorer.scores(stacked)
        return logits

    def _scorer(self, method: Method) -> StepScorer:
        if method not in self._scorers:
            self._scorers[method] = StepScorer(_VllmHead(self), method)
        return self._scorers[method]


def _sampled_rows() -> torch.Tensor | None:
    """The last scheduled token of each request (the rows vLLM samples), from the forward's
    attention metadata; None in runs without it (profiling, warm-up)."""
    from vllm.forward_context import get_forward_context, is_forward_context_available
    if not is_forward_context_available():
        return None
    metadata = get_forward_context().attn_metadata
    if isinstance(metadata, dict):
        metadata = next(iter(metadata.values()), None)
    starts = getattr(metadata, "query_start_loc", None)
    return None if starts is None else starts[1:].long() - 1


class _VllmHead:
    """What ``StepScorer.scores`` reads of a ``models.Adapter`` (the vocab head and its
    post-processing), for a vLLM model: the weight without vLLM's padding rows, this rank's
    slice of it under tensor parallelism, and vLLM's own logits for DoLa."""

    def __init__(self, model):
        from vllm.distributed import get_tp_group
        from vllm.model_executor.layers.vocab_parallel_embedding import \
            UnquantizedEmbeddingMethod

        lm_head, post = model.lm_head, model.logits_processor
        if not isinstance(getattr(lm_head, "quant_method", None), UnquantizedEmbeddingMethod):
            raise UnsupportedModel("SLED needs an unquantized vocab head")
        self.logit_scale = float(post.scale)
        self.softcap = float(post.soft_cap or 0.0)
        if self.softcap and self.logit_scale != 1.0:
            # vLLM soft-caps before scaling; the op scales first.
            raise UnsupportedModel("SLED: a model with both a logit scale and a soft-cap")
        shard = lm_head.shard_indices
        self.weight = lm_head.weight[:shard.num_org_elements]  # drop the padding rows
        self.bias = None
        self.vocab = post.org_vocab_size
        self.num_layers = model._num_layers
        group = get_tp_group()
        if group.world_size > 1 and not post.use_all_gather:
            # Ranks past the first would get no logits and skip the op's collective.
            raise UnsupportedModel("SLED under tensor parallelism needs vLLM's all-gather logits")
        self.vocab_shard = (None if group.world_size == 1
                            else VocabShard(group.device_group, shard.org_vocab_start_index))
        self._model = model

    def head(self, rows: torch.Tensor) -> torch.Tensor:
        """vLLM's own logits (gathered over ranks, post-processed) for ``[..., H]`` rows."""
        m = self._model
        flat = m.logits_processor(m.lm_head, rows.flatten(0, -2))
        return flat.float().view(*rows.shape[:-1], -1)


def __getattr__(name: str):
    """``Sled<Architecture>``: the model class vLLM loads for each of :data:`ARCHITECTURES`, made
    on first use so that registering imports no model code."""
    architecture = name.removeprefix("Sled")
    if not name.startswith("Sled") or architecture not in ARCHITECTURES:
        raise AttributeError(name)
    base = getattr(importlib.import_module(ARCHITECTURES[architecture]), architecture)
    cls = type(name, (SledModel, base), {"__module__": __name__, "__qualname__": name})
    globals()[name] = cls
    return cls
