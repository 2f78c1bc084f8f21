"""hfi: remove concepts from text-to-image diffusion models as people judge them.

The library. It reads no environment, parses no arguments and knows nothing of Airflow: the
entry points in ``tasks/`` and the DAGs in ``dags/`` do that and call in here.
"""

__version__ = "0.1.0"
