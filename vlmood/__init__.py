"""vlmood: out-of-distribution detection with vision-language models.

Convention everywhere: a detector's score is **higher for more in-distribution inputs**, and metrics treat
in-distribution as the positive class.
"""
from .clipn import CLIPNModel, CLIPNTrainer
from .detectors import CLIPN, CSP, DETECTORS, GLMCM, MCM, Detector, Energy, MaxLogit, NegLabel, Prediction, load_detector, make_detector
from .encoders import Encoder, load_encoder, parse_spec
from .evaluation import Benchmark, Report
from .features import Features, extract_features
from .metrics import evaluate
from .text import EmbeddingCache, class_embeddings, embed_texts, load_classes, load_templates
from .tuning import CoOp, LearnedPrompts, LoCoOp, load_prompts

__version__ = "0.1.0"

__all__ = [
    "CLIPN", "CLIPNModel", "CLIPNTrainer", "CSP", "DETECTORS", "GLMCM", "MCM", "NegLabel", "Benchmark", "CoOp", "Detector", "EmbeddingCache", "Encoder",
    "Energy", "Features", "LearnedPrompts", "LoCoOp", "MaxLogit", "Prediction", "Report", "class_embeddings",
    "embed_texts", "evaluate", "extract_features", "load_classes", "load_detector", "load_encoder", "load_prompts", "load_templates",
    "make_detector", "parse_spec",
]
