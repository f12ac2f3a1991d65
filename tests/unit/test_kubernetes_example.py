"""The Kubernetes example (config/kubernetes/) is a stateless Deployment emailsync can run."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from emailsync.config import load_settings
from emailsync.state.vault import KEY_CREDENTIAL

KUBE_DIR = Path(__file__).parents[2] / "config" / "kubernetes"


@pytest.fixture(scope="module")
def objects() -> dict[str, dict[str, Any]]:
    """Every object of every YAML file, by kind (one of each)."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(KUBE_DIR.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            assert doc["kind"] not in found, f"two {doc['kind']} objects"
            found[doc["kind"]] = doc
    return found


@pytest.fixture(scope="module")
def container(objects: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (only,) = objects["Deployment"]["spec"]["template"]["spec"]["containers"]
    return only  # type: ignore[no-any-return]


def mounts(container: dict[str, Any], objects: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """mountPath → the volume mounted there."""
    volumes = {v["name"]: v for v in objects["Deployment"]["spec"]["template"]["spec"]["volumes"]}
    return {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}


def test_the_example_has_a_configmap_a_secret_and_a_deployment_of_several_replicas(
    objects: dict[str, dict[str, Any]],
) -> None:
    """One of each object, and the Deployment runs more than one replica."""
    assert set(objects) == {"ConfigMap", "Secret", "Deployment"}
    spec = objects["Deployment"]["spec"]
    assert spec["replicas"] >= 2
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()


def test_no_state_lives_on_the_pod(
    objects: dict[str, dict[str, Any]], container: dict[str, Any]
) -> None:
    """Only ConfigMap, Secret and emptyDir volumes; the root filesystem is read-only."""
    for volume in objects["Deployment"]["spec"]["template"]["spec"]["volumes"]:
        assert set(volume) - {"name"} <= {"configMap", "secret", "emptyDir"}, volume
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert objects["Deployment"]["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"]


def test_the_configmap_holds_a_valid_cluster_config_without_secrets(
    objects: dict[str, dict[str, Any]], container: dict[str, Any], tmp_path: Path
) -> None:
    """The config loads; its store is PostgreSQL without a password; every secret file it
    names is a key of the Secret mounted where the config expects it; state is scratch."""
    by_path = mounts(container, objects)
    config_arg = container["args"][container["args"].index("--config") + 1]
    config_dir, config_name = config_arg.rsplit("/", 1)
    assert by_path[config_dir]["configMap"]["name"] == objects["ConfigMap"]["metadata"]["name"]
    text = objects["ConfigMap"]["data"][config_name]
    path = tmp_path / config_name
    path.write_text(text, encoding="utf-8")
    settings = load_settings(path)
    store = urlsplit(settings.daemon.state)
    assert store.scheme == "postgresql"
    assert store.password is None
    secret = objects["Secret"]
    secret_keys = set(secret["stringData"])
    files = [m.password.file for m in settings.mailboxes if m.password is not None]
    assert settings.daemon.control_token is not None
    files.append(settings.daemon.control_token.file)
    for file in files:
        assert file is not None
        volume = by_path[str(file.parent)]
        assert volume["secret"]["secretName"] == secret["metadata"]["name"]
        assert file.name in secret_keys
    assert "emptyDir" in by_path[str(settings.daemon.state_dir)]
    # The production shape: the CRM's secret is a credential of the same Secret.
    assert settings.crm is not None
    assert settings.crm.secret.credential in secret_keys
    assert settings.daemon.public_url.startswith("https://")
    (env,) = [e for e in container["env"] if e["name"] == "PGPASSWORD"]
    ref = env["valueFrom"]["secretKeyRef"]
    assert ref["name"] == secret["metadata"]["name"]
    assert ref["key"] in secret_keys


def test_probes_use_healthz_and_readyz_on_the_listen_port(
    objects: dict[str, dict[str, Any]], container: dict[str, Any], tmp_path: Path
) -> None:
    """Liveness on /healthz, readiness on /readyz, on the port the daemon listens on."""
    path = tmp_path / "emailsync.toml"
    path.write_text(objects["ConfigMap"]["data"]["emailsync.toml"], encoding="utf-8")
    settings = load_settings(path)
    (port,) = container["ports"]
    assert port["containerPort"] == settings.daemon.listen_port
    assert settings.daemon.listen_host == "0.0.0.0"  # noqa: S104 -- the pod's probes reach it
    for probe, endpoint in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        http = container[probe]["httpGet"]
        assert http["path"] == endpoint
        assert http["port"] in (port["name"], port["containerPort"])


def test_shutdown_grace_covers_the_daemons_ten_second_stop(
    objects: dict[str, dict[str, Any]],
) -> None:
    """SIGTERM ends the daemon within 10 s; Kubernetes must not SIGKILL it before."""
    assert objects["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > 10


def test_every_replica_holds_the_one_registry_key_from_the_secret(
    objects: dict[str, dict[str, Any]], container: dict[str, Any]
) -> None:
    """A key made in each pod's emptyDir would differ per replica (and per restart), and the
    state database's key check refuses all but the first: the key is a credential from the
    Secret, the same file in every pod."""
    env = {e["name"]: e for e in container["env"]}
    directory = env["CREDENTIALS_DIRECTORY"]["value"]
    volume = mounts(container, objects)[directory]
    assert volume["secret"]["secretName"] == objects["Secret"]["metadata"]["name"]
    assert KEY_CREDENTIAL in objects["Secret"]["stringData"]
