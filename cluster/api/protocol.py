"""The HTTP edge: request models (unknown keys refused, so a typo or a ``runtime_env`` never passes silently)
and the OpenAI objects built from store rows (``file``, ``fine_tuning.job``, ``fine_tuning.job.event``,
``fine_tuning.job.checkpoint``, ``list``)."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

ORGANIZATION = "rayfine"  # OpenAI's organization_id; one server is one organization
SUFFIX_PATTERN = r"^[A-Za-z0-9._-]*$"  # no ':' (the ft: name's separator), no '/'


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HyperparametersIn(_Request):
    """Each key takes ``"auto"`` (the base config's value) or a number."""

    n_epochs: Union[Literal["auto"], Annotated[int, Field(ge=1, le=50)]] = "auto"
    batch_size: Union[Literal["auto"], Annotated[int, Field(ge=1, le=4096)]] = "auto"
    learning_rate_multiplier: Union[Literal["auto"], Annotated[float, Field(gt=0, le=100)]] = "auto"


class DpoHyperparametersIn(HyperparametersIn):
    beta: Union[Literal["auto"], Annotated[float, Field(gt=0, le=100)]] = "auto"


class SupervisedIn(_Request):
    hyperparameters: Optional[HyperparametersIn] = None


class DpoIn(_Request):
    hyperparameters: Optional[DpoHyperparametersIn] = None


class MethodIn(_Request):
    """OpenAI's ``method``: ``{"type": "supervised", "supervised": {...}}`` or ``{"type": "dpo", "dpo": {...}}``."""

    type: Literal["supervised", "dpo"]
    supervised: Optional[SupervisedIn] = None
    dpo: Optional[DpoIn] = None


_Name = Annotated[str, Field(min_length=1, max_length=128)]


class WandbIn(_Request):
    """OpenAI's ``integrations[].wandb``."""

    project: _Name
    name: Optional[_Name] = None
    entity: Optional[_Name] = None
    tags: Optional[Annotated[list[Annotated[str, Field(min_length=1, max_length=64)]], Field(max_length=16)]] = None


class IntegrationIn(_Request):
    type: Literal["wandb"]
    wandb: WandbIn


class JobCreateRequest(_Request):
    model: str = Field(max_length=256)
    training_file: str = Field(max_length=128)
    validation_file: Optional[str] = Field(None, max_length=128)
    hyperparameters: Optional[HyperparametersIn] = None
    method: Optional[MethodIn] = None
    suffix: Optional[Annotated[str, Field(max_length=64, pattern=SUFFIX_PATTERN)]] = None
    seed: Optional[Annotated[int, Field(ge=0, le=2**31 - 1)]] = None
    metadata: Optional[Annotated[dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]],
                                 Field(max_length=16)]] = None
    integrations: Optional[Annotated[list[IntegrationIn], Field(max_length=4)]] = None

    @property
    def method_type(self) -> str:
        """``supervised`` (OpenAI's default) or ``dpo``."""
        return self.method.type if self.method else "supervised"

    def chosen_hyperparameters(self) -> DpoHyperparametersIn:
        """``method.<type>.hyperparameters`` (the newer form) or the top-level ``hyperparameters`` (``beta`` only
        in ``method.dpo``)."""
        from cluster.api.errors import APIError

        kind = self.method_type
        other = "supervised" if kind == "dpo" else "dpo"
        if self.method and getattr(self.method, other) is not None:
            raise APIError(400, f"method.type is '{kind}' but method.{other} is given; send method.{kind}.",
                           param=f"method.{other}", code="invalid_request")
        section = getattr(self.method, kind) if self.method else None
        nested = section.hyperparameters if section else None
        if nested is not None and self.hyperparameters is not None and (
                nested.model_dump(exclude={"beta"}) != self.hyperparameters.model_dump()):
            raise APIError(400, f"Give hyperparameters either at the top level or in method.{kind}, not both.",
                           param="hyperparameters", code="invalid_request")
        chosen = nested or self.hyperparameters or HyperparametersIn()
        return DpoHyperparametersIn(**chosen.model_dump())


# ---- responses ---------------------------------------------------------------------------------------------
def page(items: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {"object": "list", "data": items, "has_more": has_more,
            "first_id": items[0]["id"] if items else None, "last_id": items[-1]["id"] if items else None}


def file_object(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "object": "file", "bytes": row["bytes"], "created_at": row["created_at"],
            "filename": row["filename"], "purpose": row["purpose"], "status": "processed",
            "status_details": None, "expires_at": None}


def job_object(row: dict[str, Any]) -> dict[str, Any]:
    hp = row["hyperparameters"]
    return {
        "object": "fine_tuning.job", "id": row["id"], "model": row["model"], "created_at": row["created_at"],
        "finished_at": row["finished_at"], "status": row["status"],
        "fine_tuned_model": row["fine_tuned_model"] if row["status"] == "succeeded" else None,
        "organization_id": ORGANIZATION, "result_files": [], "training_file": row["training_file"],
        "validation_file": row["validation_file"], "hyperparameters": hp, "seed": row["seed"],
        # As OpenAI reports them: trained_tokens once succeeded, estimated_finish while running.
        "trained_tokens": row["trained_tokens"] if row["status"] == "succeeded" else None, "error": row["error"],
        "estimated_finish": row.get("estimated_finish") if row["status"] == "running" else None,
        "integrations": row.get("integrations") or [], "metadata": row["metadata"], "user_provided_suffix": row["suffix"],
        "method": {"type": row.get("method") or "supervised",
                   row.get("method") or "supervised": {"hyperparameters": hp}},
    }


def event_object(row: dict[str, Any]) -> dict[str, Any]:
    return {"object": "fine_tuning.job.event", "id": row["id"], "created_at": row["created_at"],
            "level": row["level"], "message": row["message"], "type": row["type"], "data": row["data"] or {}}


def checkpoint_object(row: dict[str, Any], fine_tuned_model: str) -> dict[str, Any]:
    return {"object": "fine_tuning.job.checkpoint", "id": row["id"], "created_at": row["created_at"],
            "fine_tuning_job_id": row["job_id"], "step_number": row["step"], "metrics": row["metrics"],
            "fine_tuned_model_checkpoint": f"{fine_tuned_model}:ckpt-step-{row['step']}"}


def model_object(model_id: str, created: int, parent: Optional[str] = None,
                 owned_by: str = ORGANIZATION) -> dict[str, Any]:
    out = {"id": model_id, "object": "model", "created": created, "owned_by": owned_by}
    if parent:
        out["parent"] = parent
    return out
