"""Analyses of stored results, one recipe per finding of the study (arXiv 2506.23508).

Each recipe module has ``NAME``, ``TITLE``, ``needs(study) -> reason | None`` and ``analyse(study) -> Finding``
(:class:`dynamics.analyses.stats.Finding`: tidy tables, key statistics, the claims it tests with a verdict,
and figures). A study is :meth:`dynamics.analyses.loader.Study.discover` of a folder of stored results;
recipes read tables only, they never train or recompute gradients.

* :mod:`~dynamics.analyses.learning_forgetting` -- novel-task learning vs prior-knowledge forgetting;
* :mod:`~dynamics.analyses.training` -- training curves (loss, reward, gradient norm);
* :mod:`~dynamics.analyses.influence_magnitude` -- ‖g(u)‖ and |K| per data source;
* :mod:`~dynamics.analyses.influence_direction` -- cosines with prior knowledge per data source;
* :mod:`~dynamics.analyses.base_alignment` -- likelihood of each training set under the base model;
* :mod:`~dynamics.analyses.rollout_sign` -- positively vs negatively rewarded rollouts;
* :mod:`~dynamics.analyses.knowledge_categories` -- which probe categories are hurt;
* :mod:`~dynamics.analyses.compare` -- ``dynamics compare``; :mod:`~dynamics.analyses.figures` --
  ``dynamics figures``; :mod:`~dynamics.analyses.synthetic` -- a synthetic study with known effects.
"""
