"""The models a multi-model replica holds: whole models, and LoRA adapters that share one copy of their base.

A LoRA model folder (``adapter_config.json``) loads as a peft adapter on a ``SharedBase``: the base model named
by the adapter is loaded once per replica, and every LoRA model of that base is one more adapter on it (a few MB
each). A request runs with its adapter active (``set_adapter`` when the last call used another one); one lock per
base serialises forward calls and adapter loads, so a model loading never changes weights under a running call.
The base is freed with its last adapter. Any other folder loads as a whole model, as ``rayfine serve`` of that
folder would.

``Served`` is what Serve's model multiplexing caches; it calls ``Served.__del__`` when it evicts a model (least
recently used first, beyond ``serve.max_models_per_replica``), which gives the memory back.
"""

from __future__ import annotations

import itertools
import logging
import threading
from typing import TYPE_CHECKING, Any, Callable, Optional

from core.model_folder import read_json_object
from serving.model_folder import ModelSpec

if TYPE_CHECKING:
    from core.config import ServeConfig

logger = logging.getLogger(__name__)

AUTO_CLASSES = {
    "sequence_classification": "AutoModelForSequenceClassification",
    "token_classification": "AutoModelForTokenClassification",
    "question_answering": "AutoModelForQuestionAnswering",
    "causal_lm": "AutoModelForCausalLM",
}


class Served:
    """One loaded model: its spec and task model (``serving.generation.Generator`` or an encoder task)."""

    def __init__(self, spec: ModelSpec, model: Any, release: Optional[Callable[[], None]] = None,
                 base: Optional[str] = None):
        self.spec = spec
        self.model = model
        self.base = base  # the shared base model's path, for a LoRA adapter
        self._release = release

    def unload(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()

    def __del__(self):  # Serve's multiplexing calls this when it evicts the model
        self.unload()


class SharedBase:
    """A base model with the LoRA adapters loaded on it."""

    def __init__(self, path: str, model: Any):
        self.path = path
        self.base_model = model
        self.peft = None  # the PeftModel, once the first adapter is loaded
        self.active: Optional[str] = None
        self.adapters: dict[str, str] = {}  # adapter name -> model id
        self.lock = threading.RLock()

    def add(self, name: str, model_id: str, folder: str) -> None:
        from peft import PeftModel

        with self.lock:
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(self.base_model, folder, adapter_name=name, is_trainable=False)
                self.peft.eval()
            else:
                self.peft.load_adapter(folder, adapter_name=name, is_trainable=False)
            self.adapters[name] = model_id
            self.active = None  # a loaded adapter may have become the active one

    def remove(self, name: str) -> bool:
        """Drop an adapter; True when it was the last one (the base can go)."""
        with self.lock:
            self.adapters.pop(name, None)
            if not self.adapters:
                return True
            if self.active == name or self.active is None:
                self.peft.set_adapter(next(iter(self.adapters)))
                self.active = next(iter(self.adapters))
            self.peft.delete_adapter(name)
            return False

    def forward(self, name: str, *args, **kwargs):
        with self.lock:
            if self.active != name:
                self.peft.set_adapter(name)
                self.active = name
            return self.peft(*args, **kwargs)


class AdapterView:
    """What a task model calls as its model: the shared base, run with this adapter active."""

    def __init__(self, base: SharedBase, name: str):
        self._base, self._name = base, name

    def __call__(self, *args, **kwargs):
        return self._base.forward(self._name, *args, **kwargs)

    def to(self, *args, **kwargs):
        return self

    def eval(self):
        return self

    def __getattr__(self, attr: str):  # config, generation_config, ...
        return getattr(self._base.peft, attr)


class ModelPool:
    """Loads ``Served`` models for one replica; keeps the shared bases and counts loads and evictions."""

    def __init__(self, device: str, serve: "ServeConfig", trust_remote_code: bool):
        self.device = device
        self.serve = serve
        self.trust_remote_code = trust_remote_code
        self.bases: dict[tuple, SharedBase] = {}
        self.loaded: dict[str, Served] = {}
        self.loads = 0
        self.evictions = 0
        self._names = itertools.count()
        self._lock = threading.Lock()

    def load(self, spec: ModelSpec) -> Served:
        """Load ``spec`` (blocking: run it off the event loop)."""
        if spec.adapter:
            served = self._load_adapter(spec)
        else:
            model = build_task_model(spec, self.device, self.serve, self.trust_remote_code)
            served = Served(spec, model)

            def release() -> None:
                self._forget(spec.model_id)
                _in_background(lambda: close_task_model(spec, model))

            served._release = release
        with self._lock:
            self.loaded[spec.model_id] = served
            self.loads += 1
        return served

    def _load_adapter(self, spec: ModelSpec) -> Served:
        import transformers

        adapter = read_json_object(spec.path / "adapter_config.json") or {}
        base_path = adapter.get("base_model_name_or_path")
        if not base_path:
            from core.errors import UserError

            raise UserError(f"{spec.path}/adapter_config.json: no base_model_name_or_path")
        kwargs = spec.load_kwargs()
        key = (base_path, spec.task, tuple(sorted((k, str(v)) for k, v in kwargs.items())))
        with self._lock:
            base = self.bases.get(key)
        if base is None:
            auto = getattr(transformers, AUTO_CLASSES[spec.task])
            weights = auto.from_pretrained(base_path, trust_remote_code=self.trust_remote_code, **kwargs)
            base = SharedBase(str(base_path), weights.to(self.device).eval())
            with self._lock:
                base = self.bases.setdefault(key, base)
        name = f"adapter{next(self._names)}"
        base.add(name, spec.model_id, str(spec.path))
        try:
            model = build_task_model(spec, self.device, self.serve, self.trust_remote_code,
                                     weights=AdapterView(base, name))
        except BaseException:
            self._release_adapter(key, base, name)
            raise

        def release() -> None:
            def unload() -> None:
                close_task_model(spec, model)  # its requests finish first: they run the adapter on the base
                self._release_adapter(key, base, name)

            self._forget(spec.model_id)
            _in_background(unload)

        return Served(spec, model, release, base=base.path)

    def _release_adapter(self, key: tuple, base: SharedBase, name: str) -> None:
        if base.remove(name):
            with self._lock:
                if self.bases.get(key) is base and not base.adapters:
                    del self.bases[key]

    def _forget(self, model_id: str) -> None:
        with self._lock:
            if self.loaded.pop(model_id, None) is not None:
                self.evictions += 1

    def status(self) -> dict[str, Any]:
        """What this replica holds: loaded models, shared bases with their adapters' models, counters, memory."""
        import psutil

        with self._lock:
            bases = [{"path": b.path, "models": sorted(b.adapters.values())} for b in self.bases.values()]
            loaded = sorted(self.loaded)
        return {"models_loaded": loaded, "base_models_loaded": bases, "loads": self.loads,
                "evictions": self.evictions, "rss_bytes": psutil.Process().memory_info().rss}


def build_task_model(spec: ModelSpec, device: str, serve: "ServeConfig", trust_remote_code: bool, weights=None):
    """The task model of ``spec``; ``weights``: its model already loaded (serving.pool's LoRA adapters)."""
    if spec.task == "causal_lm":
        from serving.generation import Generator

        return Generator(spec, device, serve, trust_remote_code, weights)
    from serving.encoders import ENCODER_TASKS

    return ENCODER_TASKS[spec.task](spec, device, serve.max_input_tokens, trust_remote_code, weights)


def _in_background(unload: Callable[[], None]) -> None:
    """Unload off the caller's thread: Serve evicts a model on the replica's event loop, which must keep handing
    the outputs of the model's last requests to their clients until they finish."""
    threading.Thread(target=unload, name="unload", daemon=True).start()


def close_task_model(spec: ModelSpec, model: Any) -> None:
    """Stop what a task model runs besides its weights: a causal LM's generation engine (a thread and a cache)."""
    if spec.task == "causal_lm":
        model.close()
