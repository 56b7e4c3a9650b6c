"""distillery: a Prefect DAG that distills a big model into a small one and ships it."""

__version__ = "0.1.0"
