"""``pellucid serve``: a REST service that explains uploaded images (see ``app.py``)."""

from pellucid.service.app import create_app

__all__ = ["create_app"]
