"""Everything inside one fine-tuning trial, with no Ray or MLflow import at module level.

What it holds: the typed run config (``config``), tasks and label noise (``data``, ``idx``,
``noise``), the noise matrix a run uses and its estimate (``transition``), timm models, source
pretraining and layer groups (``models``), the regularizers (``regularizers``), the one training
loop (``loop.fine_tune``), the Hessian measures (``hessian``, ``measures``) and the Ray Tune
function trainable (``trainable.run_trial``, the only place that imports ``ray.tune``, inside it).

It may import torch, timm, numpy, scipy and scikit-learn; never ``tuning`` or ``search_spaces``.
Entry points: ``trainables.loop.fine_tune`` / ``train_to_end`` and ``trainables.config.RunConfig``.
"""
