"""Fixtures for the API semantics tests: the seed manifest's objects, as a beginner writes them."""
from __future__ import annotations

import copy
from typing import Any

import pytest

SEED_SERVICE: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Service",
    "metadata": {"name": "flask-kubernetes-service", "namespace": "default"},
    "spec": {"selector": {"app": "flask-kubernetes"}, "ports": [{"port": 6000, "targetPort": 5000}],
             "type": "LoadBalancer"},
}

SEED_DEPLOYMENT: dict[str, Any] = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {"name": "flask-kubernetes", "namespace": "default"},
    "spec": {
        "replicas": 4,
        "selector": {"matchLabels": {"app": "flask-kubernetes"}},
        "template": {
            "metadata": {"labels": {"app": "flask-kubernetes"}},
            "spec": {"containers": [{"name": "flask-kubernetes", "image": "flask-kubernetes:latest",
                                     "ports": [{"containerPort": 5000}]}]},
        },
    },
}


@pytest.fixture
def seed_service() -> dict[str, Any]:
    return copy.deepcopy(SEED_SERVICE)


@pytest.fixture
def seed_deployment() -> dict[str, Any]:
    return copy.deepcopy(SEED_DEPLOYMENT)
