"""Model files in and out, in one import for callers. Each job lives in its own module:

- `bnfold.loading`: reading a model file, and what makes one acceptable (one line per problem);
- `bnfold.tensors`: tensor values and storage facts, with no file access;
- `bnfold.external`: external data references, their path safety, reads and copies;
- `bnfold.destination`: what an output path is (file, link, device, FIFO, stdout) and streaming;
- `bnfold.staging`: writing an output aside, verifying it there, committing it atomically.
"""

from bnfold.destination import Destination, classify as classify_destination, same_file
from bnfold.external import ALIGN, DataCopies, read_tensor
from bnfold.loading import LoadedModel, Spill, load_model
from bnfold.staging import StagedModel, begin_staging, save_model, stage_model
from bnfold.tensors import is_external, iter_tensors

__all__ = [
    "ALIGN",
    "DataCopies",
    "Destination",
    "LoadedModel",
    "Spill",
    "StagedModel",
    "begin_staging",
    "classify_destination",
    "is_external",
    "iter_tensors",
    "load_model",
    "read_tensor",
    "same_file",
    "save_model",
    "stage_model",
]
