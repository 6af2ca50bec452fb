"""Worked examples, each with a ``run(...)`` that returns what it measured and a ``main()`` for the
command line (``python -m optkern.examples.<name>`` or ``python examples/<name>.py``):

* :mod:`~optkern.examples.linear_regression`: BGD, SGD and mini-batch GD against the closed form;
* :mod:`~optkern.examples.mlp`: a NumPy MLP on digits made in code, with every optimizer
  (``python -m optkern demo``);
* :mod:`~optkern.examples.sparse_logistic`: adaptive methods against SGD on sparse features;
* :mod:`~optkern.examples.ill_conditioned`: SGD against Momentum and Nesterov in a narrow valley.

They need only NumPy; plotting uses matplotlib when it is installed and is skipped otherwise.
"""
