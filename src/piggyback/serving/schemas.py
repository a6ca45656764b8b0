"""The JSON shapes of the API, as pydantic models: they validate nothing the server receives (the
predict body is read by `inputs`, which accepts multipart too) but document every answer in the
generated OpenAPI page (/docs)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

__all__ = [
    "ErrorResponse",
    "Health",
    "PredictJSON",
    "PredictResponse",
    "TaskInfo",
    "TaskResult",
    "TasksResponse",
]


class Health(BaseModel):
    status: str = Field(examples=["ok"])
    tasks: int = Field(description="Number of tasks served.")


class TaskInfo(BaseModel):
    name: str
    num_classes: int
    classes: list[str]
    metadata: dict[str, Any] = Field(default_factory=dict)


class TasksResponse(BaseModel):
    tasks: list[TaskInfo]


class Prediction(BaseModel):
    label: str
    probability: float


class TaskResult(BaseModel):
    image: int = Field(description="Index of the image in the request (0 for a single image).")
    task: str = Field(description="The task that answered.")
    requested: str = Field(description="The task asked for: a name or 'auto'.")
    routing_confidence: float | None = Field(
        None, description="With 'auto': how confident the router was in choosing `task`."
    )
    routed_by: str | None = Field(
        None, description="With 'auto': how the task was chosen ('prototypes' or 'entropy')."
    )
    predictions: list[Prediction] = Field(description="The top_k classes, most probable first.")


class PredictResponse(BaseModel):
    results: list[TaskResult] = Field(description="One result per image and task asked.")


class PredictJSON(BaseModel):
    """The JSON form of a predict request (the multipart form has the same fields)."""

    image: str | None = Field(None, description="The image file's bytes, base64 (or a data: URL).")
    images: list[str] | None = Field(None, description="Several images, base64.")
    task: str | list[str] = Field(
        "auto", description="A task name, several names (list or comma-separated), or 'auto'."
    )
    top_k: int = Field(5, ge=1, description="Classes per result (clipped to the task's classes).")


class ErrorDetail(BaseModel):
    code: str = Field(examples=["invalid_image"])
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail
