"""iapt-train: train IAPT (Instruction-Aware Prompt Tuning) adapters on Hugging Face decoders and
write them as IAPT spec v1 files that the toolkit's `iapt` command validates and serves.

    from iapt_train import IaptConfig, get_iapt_model, IaptDataCollator
    model = get_iapt_model(hf_model, IaptConfig(n_soft_tokens=4, bottleneck=64))
    ...train (plain loop or transformers.Trainer)...
    model.save_pretrained("out")          # out/adapter.iapt.safetensors

See README.md (the API page) for every option and its spec v1 name.
"""

__version__ = "0.1.0"

from .config import ACTIVATIONS, FIXED_ACTIVATIONS, RATIONAL_VARIANTS, IaptConfig  # noqa: E402
from .data import IaptDataCollator, load_jsonl  # noqa: E402
from .hf import IaptCheckpointCallback  # noqa: E402
from .generator import IaptGenerator, RationalActivation, fit_rational  # noqa: E402
from .model import ADAPTER_FILE, IaptModel, generators_from_file, get_iapt_model, trainable_parameters  # noqa: E402
from .training import TrainArgs, accumulate_gradients, evaluate_loss, exact_match, lr_at, train  # noqa: E402

__all__ = [
    "__version__", "IaptConfig", "ACTIVATIONS", "FIXED_ACTIVATIONS", "RATIONAL_VARIANTS", "IaptDataCollator",
    "load_jsonl", "IaptGenerator", "RationalActivation", "fit_rational", "IaptModel", "get_iapt_model",
    "generators_from_file", "trainable_parameters", "ADAPTER_FILE", "TrainArgs", "train", "evaluate_loss",
    "exact_match", "lr_at", "IaptCheckpointCallback", "accumulate_gradients",
]
