"""The Kubernetes example runs the image `make image` builds (.ci/build-image), as its user."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

import emailsync

REPO = Path(__file__).parents[2]
BUILD_IMAGE = (REPO / ".ci" / "build-image").read_text(encoding="utf-8")


def pod_spec() -> dict[str, Any]:
    text = (REPO / "config" / "kubernetes" / "deployment.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def test_the_deployment_names_the_image_make_image_tags() -> None:
    """localhost/emailsync:<emailsync.__version__>, the tag .ci/build-image commits."""
    assert "image=localhost/emailsync:$version" in BUILD_IMAGE
    (container,) = pod_spec()["containers"]
    assert container["image"] == f"localhost/emailsync:{emailsync.__version__}"


def test_the_deployment_runs_as_the_images_user() -> None:
    """runAsUser/runAsGroup are the uid/gid the image's USER and its emailsync user have."""
    match = re.search(r"^uid=(\d+)$", BUILD_IMAGE, re.M)
    assert match is not None
    uid = int(match.group(1))
    assert uid != 0
    assert '--user "$uid:$uid"' in BUILD_IMAGE
    context = pod_spec()["securityContext"]
    assert (context["runAsUser"], context["runAsGroup"]) == (uid, uid)
