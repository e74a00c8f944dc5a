"""Analysis tools: ``kdqat analyze`` (teacher vs. quantized students).

- :mod:`~kdqat_dist.analysis.attention_distance`: KL, ranking loss, cover length ratio per head (Exp1);
- :mod:`~kdqat_dist.analysis.norms`: Kobayashi et al.'s norm-based decomposition of self-attention (Exp3);
- :mod:`~kdqat_dist.analysis.hessian`: Hessian max-eigenvalues by power iteration (Exp2);
- :mod:`~kdqat_dist.analysis.collect`: one pass over a dev sample through the training taps;
- :mod:`~kdqat_dist.analysis.plots` / :mod:`~kdqat_dist.analysis.report`: figures, JSON, Markdown.

The TensorBoard diagnostics ``kdqat train`` logs are :mod:`kdqat_dist.engine.diagnostics` (the loop calls them).
"""
