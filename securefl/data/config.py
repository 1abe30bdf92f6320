"""The ``data`` section of an experiment: which data set, how it is split between the owners, and the public set."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field as PydField
from pydantic import model_validator

from securefl.core.section import Section


class DirichletPartition(Section):
    kind: Literal["dirichlet"] = "dirichlet"
    alpha: float = PydField(0.5, gt=0)
    min_size: int = PydField(10, ge=1, description="resample until every participant has this many records")


class ShardPartition(Section):
    kind: Literal["shards"]
    classes_per_party: int = PydField(2, ge=1)


class IidPartition(Section):
    kind: Literal["iid"]


class FewShotPartition(Section):
    kind: Literal["few_shot"]
    per_class: int = PydField(5, ge=1, description="records of every class each participant holds")


class ExplicitPartition(Section):
    kind: Literal["explicit"]
    assignment: list[list[int]] = PydField(min_length=1, description="training-split indices per participant")


Partition = Annotated[
    DirichletPartition | ShardPartition | IidPartition | ExplicitPartition | FewShotPartition, PydField(discriminator="kind")
]


class FilesConfig(Section):
    """Data the owners bring: one table per participant (``participants[].data_file``), plus a public and a
    test table. CSV with a header row; every column but ``label_column`` is a numeric feature."""

    label_column: str = "label"
    num_classes: int = PydField(ge=2, description="labels are 0..num_classes-1 (no single silo may see them all)")
    test_file: str | None = PydField(None, description="evaluation table (default: none given in code)")
    public_file: str | None = PydField(None, description="public table (its labels are used only if public_labelled)")
    transform: Literal["none", "signed_log1p"] = PydField(
        "none", description="a per-record transform (no statistics of anyone's data): sign(x)·log(1+|x|)")
    standardize: Literal["none", "public"] = PydField(
        "none", description="public: z-score every feature with the public table's mean and std (public facts)")


class DataConfig(Section):
    dataset: Literal["digits", "fashion_mnist", "breast_cancer", "files", "tables"] = PydField(
        "digits", description="files: each owner's CSV; tables: given in code through securefl.api")
    data_dir: str | None = None
    files: FilesConfig | None = PydField(None, description="dataset = files or tables")
    partition: Partition = PydField(default_factory=DirichletPartition)
    public_size: int = PydField(0, ge=0, description="records carved out of the train split as the public set")
    public_labelled: bool = PydField(False, description="may protocols use the public set's labels?")
    public_classes: list[int] | None = PydField(None, description="restrict the public set to these classes (A2)")
    private_classes: list[int] | None = PydField(None, description="restrict private data and test set (A2)")
    val_fraction: float = PydField(0.15, ge=0, lt=1)
    max_train_records: int | None = PydField(None, ge=10, description="subsample the train split (quick runs)")
    holdout_size: int = PydField(
        0, ge=0, description="train records held out as the evaluation set in place of the test split, so that "
                             "hyperparameters are chosen without ever reading the test set (0: evaluate on test)")

    @model_validator(mode="after")
    def _classes_disjoint(self) -> DataConfig:
        if self.public_classes and self.private_classes and set(self.public_classes) & set(self.private_classes):
            raise ValueError("public_classes and private_classes must not overlap")
        return self
