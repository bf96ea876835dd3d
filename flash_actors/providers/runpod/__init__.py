"""The RunPod provider: RunPod Serverless's control plane (GraphQL) and data plane (/v2)."""

from __future__ import annotations
