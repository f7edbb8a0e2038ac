"""Few-shot prompt learning: CoOp and LoCoOp trainers, and learned prompts every detector can use.

    from vlmood.tuning import LoCoOp
    prompts = LoCoOp(encoder, classes).fit("train_folder/", shots=16)
    prompts.save("prompts.safetensors")

See :mod:`.trainer` (the loop and the reference facts), :mod:`.coop`, :mod:`.locoop`, :mod:`.views` (frozen
augmented-view features) and :mod:`.prompts` (the file format).
"""
from .coop import CoOp
from .locoop import LoCoOp
from .prompts import LearnedPrompts, load_prompts
from .trainer import NonFiniteLossError, PromptTrainer, lr_at
from .views import DEFAULT_VIEWS, ViewStorageError

__all__ = ["DEFAULT_VIEWS", "CoOp", "LearnedPrompts", "LoCoOp", "NonFiniteLossError", "PromptTrainer",
           "ViewStorageError", "load_prompts", "lr_at"]
