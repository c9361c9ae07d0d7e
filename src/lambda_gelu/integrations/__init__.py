"""Integrations with optional third-party packages: Hugging Face transformers, Lightning, TensorBoard.

Nothing here is imported by ``import lambda_gelu``. :mod:`.transformers` is loaded
on demand by :func:`lambda_gelu.convert` / :func:`lambda_gelu.relufy` once the
user's program has imported ``transformers`` itself; the other modules are
imported explicitly by the user (``from lambda_gelu.integrations.lightning import
LambdaGELUCallback``) and need their extra (``pip install lambda-gelu[hf]`` or
``lambda-gelu[train]``).
"""
