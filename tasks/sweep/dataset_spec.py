"""The `[dataset]` section of a sweep spec: training images and where their captions come from."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from tasks.sweep.fields import Frozen, PositiveInt, check_builtin

BUILTIN_DATASETS = ("demo-world",)


class DatasetSpec(Frozen):
    """Training images and where their captions come from (`source`), or `builtin:demo-world`.

    Sources: `sidecar` (img.png + img.txt), `kohya` (`N_name/` repeat folders), `metadata_jsonl`
    (`file_name` + `text`), `csv` (image column + caption column or template, optional row filter);
    `auto` (default): kohya when the folder holds `N_name` repeat folders and no images of its own,
    else sidecar. `on_bad_file`: a damaged or too-small image, or a missing caption, stops the sweep
    (`error`) or is left out and listed (`skip`).
    """

    path: str
    trigger_word: str = Field(min_length=1)
    source: Literal["auto", "sidecar", "kohya", "metadata_jsonl", "csv"] = "auto"
    on_bad_file: Literal["error", "skip"] = "error"
    caption_extension: str = Field(default=".txt", pattern=r"^\.[A-Za-z0-9]+$")
    min_images: PositiveInt = 1
    metadata_file: str = Field(default="metadata.jsonl", min_length=1)
    csv_file: str | None = Field(default=None, min_length=1)
    csv_image_column: str = Field(default="image", min_length=1)
    csv_caption_column: str | None = Field(default=None, min_length=1)
    caption_template: str | None = Field(default=None, min_length=1)
    csv_filter: dict[str, tuple[str, ...]] = Field(default_factory=dict)
    prefix_trigger: bool = False
    caption_dropout: float = Field(default=0.0, ge=0.0, le=1.0)
    shuffle_tags: bool = False
    keep_tokens: int = Field(default=0, ge=0)
    captioner: str | None = None

    @field_validator("path")
    @classmethod
    def _builtin_known(cls, value: str) -> str:
        check_builtin(value, BUILTIN_DATASETS)
        return value

    @field_validator("trigger_word")
    @classmethod
    def _one_word(cls, value: str) -> str:
        if any(ch.isspace() for ch in value):
            raise ValueError("the trigger word must be one token without spaces, e.g. 'zqx' or 'sks_style'")
        return value

    @field_validator("captioner")
    @classmethod
    def _known_captioner(cls, value: str | None) -> str | None:
        if value is not None and not (value.startswith("blip:") and len(value) > len("blip:")):
            raise ValueError("allowed: 'blip:<local folder with a BLIP captioning model>'; nothing is downloaded")
        return value

    @model_validator(mode="after")
    def _source_fields_agree(self) -> DatasetSpec:
        problems = []
        if self.path.startswith("builtin:") and self.source not in ("auto", "sidecar"):
            problems.append(f"{self.path} is a sidecar dataset; source {self.source!r} needs a folder path")
        csv_only = {"csv_file": self.csv_file, "csv_caption_column": self.csv_caption_column,
                    "caption_template": self.caption_template, "csv_filter": self.csv_filter or None}
        if self.source != "csv":
            problems += [f"{k} = {v!r} is only used with source = 'csv' (source is {self.source!r})"
                         for k, v in csv_only.items() if v is not None]
        elif self.csv_file is None:
            problems.append("source = 'csv' needs csv_file = '<file relative to dataset.path>'")
        if self.source == "csv" and (self.csv_caption_column is None) == (self.caption_template is None):
            problems.append("source = 'csv' needs exactly one of csv_caption_column or caption_template, "
                            "e.g. caption_template = 'a painting by {artist}, {title}'")
        if self.keep_tokens and not self.shuffle_tags:
            problems.append(f"keep_tokens = {self.keep_tokens} only applies with shuffle_tags = true")
        if problems:
            raise ValueError("; ".join(problems))
        return self
