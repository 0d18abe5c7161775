"""The `ec2` node provider against moto's EC2 server, run as a real process on loopback: real
boto3 calls for launch (on-demand, spot, idempotent per node id), reconcile after a restart,
terminate, and launch errors classified as capacity shortages or mistakes to fix.

moto checks AMIs, instance types and key pairs only when asked at start-up
(`MOTO_ENABLE_AMI_VALIDATION` and friends), so this module starts its own server with those set
rather than sharing the in-process one the S3 tests use.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from cloud_metadata import AwsImds, Recorded, Reply, closed_port_url

from autoscaler.policy import Pool
from autoscaler.providers import ec2
from autoscaler.providers.base import (
    LaunchError,
    LaunchRequest,
    NodeStatus,
    Provider,
    ProviderNode,
)
from autoscaler.providers.ec2 import Ec2Error, Ec2Provider

REGION = "us-east-1"
ZONE = "us-east-1a"
SECRET = "s3cr3t with 'quotes' and $dollars"
CONTROLLER = "10.0.0.2:7070"
PRIVATE_IP = "10.1.2.3"


def _wait(check: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture(scope="module")
def moto_ec2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's server as a subprocess on a free 127.0.0.1 port, validating AMIs, instance types
    and key pairs like EC2 does."""
    log_path = tmp_path_factory.mktemp("moto") / "server.log"
    env = {
        **os.environ,
        "MOTO_ENABLE_AMI_VALIDATION": "true",
        "MOTO_EC2_ENABLE_INSTANCE_TYPE_VALIDATION": "true",
        "MOTO_ENABLE_KEYPAIR_VALIDATION": "true",
    }
    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        found = _wait(
            lambda: (
                proc.poll() is None
                and re.search(r"Running on (http://127\.0\.0\.1:\d+)", log_path.read_text())
            ),
            "moto's server to listen",
        )
        yield found.group(1)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(autouse=True)
def aws_env(moto_ec2: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The standard AWS environment points only at the loopback server, with fake credentials."""
    env = {
        "AWS_ENDPOINT_URL": moto_ec2,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_REGION", "AWS_SESSION_TOKEN", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def network(moto_ec2: str) -> dict[str, str]:
    """An AMI moto knows, and a subnet, security group and key pair in ZONE."""
    client = boto3.client(
        "ec2", region_name=REGION, endpoint_url=moto_ec2,
        aws_access_key_id="testing", aws_secret_access_key="testing",
    )  # fmt: skip
    ami = client.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    vpc = client.create_vpc(CidrBlock="10.9.0.0/16")["Vpc"]["VpcId"]
    subnet = client.create_subnet(VpcId=vpc, CidrBlock="10.9.1.0/24", AvailabilityZone=ZONE)
    group = client.create_security_group(GroupName="stoke-nodes", Description="n", VpcId=vpc)
    client.create_key_pair(KeyName="stoke-key")
    return {
        "ami": ami,
        "subnet": subnet["Subnet"]["SubnetId"],
        "group": group["GroupId"],
        "key": "stoke-key",
    }


@pytest.fixture
def cluster() -> str:
    """A cluster name of its own per test: they share one moto server."""
    return f"c{uuid.uuid4().hex[:10]}"


@pytest.fixture
def aws() -> Any:
    return boto3.client("ec2")


def make_pool(network: dict[str, str], **overrides: Any) -> Pool:
    data: dict[str, Any] = {
        "name": "gpu-od",
        "provider": "ec2",
        "instance_type": "t3.micro",
        "zones": [ZONE],
        "ec2": {
            "ami": network["ami"],
            "subnet_id": network["subnet"],
            "security_group_ids": [network["group"]],
            "key_name": network["key"],
            "tags": {"team": "ml"},
            "node_args": ["--slots", "2", "--cpu-memory", "6GiB"],
        },
    }
    ec2_overrides = overrides.pop("ec2", {})
    data.update(overrides)
    data["ec2"] = {**data["ec2"], **ec2_overrides}
    return Pool.model_validate(data)


def make_request(pool: Pool, **overrides: Any) -> LaunchRequest:
    fields: dict[str, Any] = {
        "node_id": f"n-{uuid.uuid4().hex[:8]}",
        "pool": pool,
        "zone": ZONE,
        "controller_address": CONTROLLER,
        "secret": SECRET,
    }
    return LaunchRequest(**{**fields, **overrides})


def describe(aws: Any, instance_id: str) -> dict[str, Any]:
    reservations = aws.describe_instances(InstanceIds=[instance_id])["Reservations"]
    return dict(reservations[0]["Instances"][0])


def launched_user_data(aws: Any, instance_id: str) -> str:
    attribute = aws.describe_instance_attribute(InstanceId=instance_id, Attribute="userData")
    return base64.b64decode(attribute["UserData"]["Value"]).decode()


# -- launch ----------------------------------------------------------------------------------


def test_on_demand_launch_sets_type_zone_network_and_tags(
    cluster: str, network: dict[str, str], aws: Any
) -> None:
    provider: Provider = Ec2Provider(cluster)
    request = make_request(make_pool(network))
    node = provider.launch(request)
    instance = describe(aws, node.provider_id)
    tags = {t["Key"]: t["Value"] for t in instance["Tags"]}
    assert (node.node_id, node.pool, node.zone) == (request.node_id, "gpu-od", ZONE)
    assert node.status in (NodeStatus.PENDING, NodeStatus.RUNNING)
    assert instance["InstanceType"] == "t3.micro"
    assert instance["Placement"]["AvailabilityZone"] == ZONE
    assert instance["SubnetId"] == network["subnet"]
    assert [g["GroupId"] for g in instance["SecurityGroups"]] == [network["group"]]
    assert instance["KeyName"] == network["key"]
    assert "InstanceLifecycle" not in instance
    assert instance["MetadataOptions"]["HttpTokens"] == "required"
    assert tags == {
        "stoke:cluster": cluster,
        "stoke:pool": "gpu-od",
        "stoke:node-id": request.node_id,
        "Name": f"stoke-{cluster}-{request.node_id}",
        "team": "ml",
    }
    script = launched_user_data(aws, node.provider_id)
    assert request.node_id in script and CONTROLLER in script


def test_spot_launch_is_a_spot_instance(cluster: str, network: dict[str, str], aws: Any) -> None:
    node = Ec2Provider(cluster).launch(make_request(make_pool(network, market="spot")))
    assert describe(aws, node.provider_id).get("InstanceLifecycle") == "spot"


def test_same_node_id_launches_one_instance(
    cluster: str, network: dict[str, str], aws: Any
) -> None:
    request = make_request(make_pool(network))
    first = Ec2Provider(cluster).launch(request)
    again = Ec2Provider(cluster).launch(request)  # a retry, even from a restarted controller
    found = aws.describe_instances(
        Filters=[{"Name": "tag:stoke:node-id", "Values": [request.node_id]}]
    )["Reservations"]
    assert again.provider_id == first.provider_id
    assert [i["InstanceId"] for r in found for i in r["Instances"]] == [first.provider_id]


def test_client_token_is_stable_per_node_and_within_ec2_limit() -> None:
    token = ec2.client_token("prod", "n-1")
    assert token == ec2.client_token("prod", "n-1")
    assert token != ec2.client_token("prod", "n-2") != ec2.client_token("dev", "n-1")
    assert len(token) <= 64 and token.isascii()


# -- user data -------------------------------------------------------------------------------


class ImdsWithAddress(AwsImds):
    """IMDSv2 (tokens required) that also serves the instance's private IPv4 address."""

    def handle(self, request: Recorded) -> Reply:
        reply = super().handle(request)
        if reply.status == 404 and request.path == "/latest/meta-data/local-ipv4":
            return Reply.text(200, PRIVATE_IP)
        return reply


SHIM = """#!{python}
import json, os, sys
from stoke.cli import build_parser
from stoke.commands.node import build_config
args = build_parser().parse_args(sys.argv[1:])
assert args.command == "node", args.command
config = build_config(args)
with open(os.environ["SHIM_OUT"], "w") as out:
    json.dump({{"controller": config.controller, "advertise": config.advertise,
               "listen": config.listen, "node_id": config.store.node_id,
               "secret": config.secret, "slots": config.slots, "cpu_memory": config.cpu_memory,
               "preemption": config.preemption.source,
               "exit_when_drained": config.preemption.exit_when_drained}}, out)
"""


def test_user_data_starts_stoke_node_with_real_arguments(
    cluster: str, network: dict[str, str], aws: Any, tmp_path: Path
) -> None:
    """The launched script, run by sh with a `stoke` whose `node` parses the arguments with the
    real parser and config builder, against an IMDSv2 server on loopback."""
    if shutil.which("curl") is None:
        pytest.skip("the user data script uses curl, which this machine lacks")
    request = make_request(make_pool(network))
    node = Ec2Provider(cluster).launch(request)
    script = launched_user_data(aws, node.provider_id)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "stoke"
    shim.write_text(SHIM.format(python=sys.executable))
    shim.chmod(0o755)
    with ImdsWithAddress() as imds:
        (tmp_path / "user-data").write_text(script.replace(ec2.IMDS, imds.url))
        env = {
            "PATH": f"{bin_dir}:/usr/bin:/bin",
            "HOME": str(tmp_path),
            "SHIM_OUT": str(tmp_path / "args.json"),
        }
        result = subprocess.run(
            ["sh", str(tmp_path / "user-data")], env=env, capture_output=True, timeout=120
        )
        token_calls = imds.count(method="PUT")
    assert result.returncode == 0, result.stderr.decode()
    assert token_calls == 1
    assert json.loads((tmp_path / "args.json").read_text()) == {
        "controller": CONTROLLER,
        "advertise": f"{PRIVATE_IP}:{ec2.NODE_PORT}",
        "listen": f"0.0.0.0:{ec2.NODE_PORT}",
        "node_id": request.node_id,
        "secret": SECRET,
        "slots": 2,
        "cpu_memory": 6 << 30,
        "preemption": "aws",
        "exit_when_drained": True,
    }


def test_own_user_data_gets_the_exports_after_its_first_line(network: dict[str, str]) -> None:
    pool = make_pool(network, ec2={"user_data": "#!/bin/bash\necho mine\n"})
    script = ec2.user_data(make_request(pool, node_id="n-7"), "prod")
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash" and lines[-1] == "echo mine"
    assert "export STOKE_NODE_ID=n-7" in lines[1:-1]
    assert "export STOKE_CLUSTER=prod" in lines[1:-1]


def test_own_user_data_without_shebang_is_refused(network: dict[str, str]) -> None:
    pool = make_pool(network, ec2={"user_data": "#cloud-config\nruncmd: [stoke]\n"})
    with pytest.raises(LaunchError, match=r"pools\.gpu-od\.ec2\.user_data must be a shell"):
        ec2.user_data(make_request(pool), "prod")


# -- reconcile and terminate -----------------------------------------------------------------


def test_a_restarted_controller_lists_its_nodes_and_no_others(
    cluster: str, network: dict[str, str]
) -> None:
    before = Ec2Provider(cluster)
    spot = before.launch(make_request(make_pool(network, name="cpu-spot", market="spot")))
    od = before.launch(make_request(make_pool(network)))
    Ec2Provider(f"{cluster}-other").launch(make_request(make_pool(network)))
    listed = {n.provider_id: n for n in Ec2Provider(cluster).list_nodes()}
    assert listed.keys() == {spot.provider_id, od.provider_id}
    for launched in (spot, od):
        node = listed[launched.provider_id]
        assert (node.node_id, node.pool, node.zone) == (launched.node_id, launched.pool, ZONE)
        assert node.status in (NodeStatus.PENDING, NodeStatus.RUNNING)
        assert abs(node.launched_unix - time.time()) < 300


def test_a_stopped_instance_is_listed_as_gone(
    cluster: str, network: dict[str, str], aws: Any
) -> None:
    provider = Ec2Provider(cluster)
    node = provider.launch(make_request(make_pool(network)))
    aws.stop_instances(InstanceIds=[node.provider_id])
    assert [(n.provider_id, n.status) for n in provider.list_nodes()] == [
        (node.provider_id, NodeStatus.GONE)
    ]


def test_terminate_removes_the_node_and_is_idempotent(
    cluster: str, network: dict[str, str]
) -> None:
    provider = Ec2Provider(cluster)
    node = provider.launch(make_request(make_pool(network)))
    kept = provider.launch(make_request(make_pool(network)))
    provider.terminate(node)
    assert [n.provider_id for n in provider.list_nodes()] == [kept.provider_id]
    provider.terminate(node)
    Ec2Provider(cluster).terminate(node)  # a fresh provider, which never saw it: still fine
    provider.terminate(dataclasses.replace(node, provider_id="i-0123456789abcdef0"))


def test_list_nodes_on_an_unreachable_endpoint_names_the_fix(
    cluster: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    provider = Ec2Provider(cluster, endpoint_url=closed_port_url())
    with pytest.raises(Ec2Error, match=r"listing instances in us-east-1: .*EndpointConnection"):
        provider.list_nodes()


def test_without_a_region_each_call_names_where_to_set_one(
    cluster: str, network: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    provider = Ec2Provider(cluster)
    request = make_request(make_pool(network))
    with pytest.raises(LaunchError, match=r"set `ec2.region` in the pool, or AWS_DEFAULT_REGION"):
        provider.launch(request)
    with pytest.raises(Ec2Error, match="set AWS_DEFAULT_REGION"):
        provider.list_nodes()
    gone = ProviderNode(request.node_id, "gpu-od", ZONE, "i-0123456789abcdef0", NodeStatus.GONE, 0)
    with pytest.raises(Ec2Error, match="set AWS_DEFAULT_REGION"):
        provider.terminate(gone)


def test_a_pool_region_is_listed_after_a_restart(cluster: str, network: dict[str, str]) -> None:
    """A pool in another region than the environment's: `for_pools` finds its nodes again."""
    west = boto3.client("ec2", region_name="us-west-2")
    ami = west.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    pool = make_pool(
        network,
        zones=["us-west-2a"],
        ec2={"region": "us-west-2", "ami": ami, "subnet_id": None,
             "security_group_ids": [], "key_name": None},
    )  # fmt: skip
    node = Ec2Provider(cluster).launch(make_request(pool, zone="us-west-2a"))
    assert Ec2Provider(cluster).list_nodes() == []  # us-east-1 only
    listed = Ec2Provider.for_pools(cluster, [pool]).list_nodes()
    assert [(n.provider_id, n.zone) for n in listed] == [(node.provider_id, "us-west-2a")]
    Ec2Provider.for_pools(cluster, [pool]).terminate(node)
    assert Ec2Provider.for_pools(cluster, [pool]).list_nodes() == []


# -- launch errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"ec2": {"ami": "ami-0123456789abcdef0"}}, r"ami-0123456789abcdef0 .*gpu-od\.ec2\.ami"),
        ({"ec2": {"subnet_id": "subnet-0123456789abcdef0"}}, r"fix pools\.gpu-od\.ec2\.subnet_id"),
        ({"ec2": {"security_group_ids": ["sg-0123456789"]}}, r"ec2\.security_group_ids"),
        ({"ec2": {"key_name": "missing"}}, r"'missing' does not exist .*ec2\.key_name"),
        ({"instance_type": "t3.colossal"}, r"check pools\.gpu-od\.instance_type"),
    ],
)  # fmt: skip
def test_a_bad_setting_is_a_launch_error_naming_it(
    cluster: str, network: dict[str, str], overrides: dict[str, Any], expected: str
) -> None:
    provider = Ec2Provider(cluster)
    with pytest.raises(LaunchError, match=expected) as caught:
        provider.launch(make_request(make_pool(network, **overrides)))
    assert caught.value.capacity is False
    assert provider.list_nodes() == []


def test_an_unreachable_endpoint_is_a_launch_error(
    cluster: str, network: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    provider = Ec2Provider(cluster, endpoint_url=closed_port_url())
    with pytest.raises(LaunchError, match="AWS_ENDPOINT_URL") as caught:
        provider.launch(make_request(make_pool(network)))
    assert caught.value.capacity is False


def client_error(code: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": f"{code} happened"}}, "RunInstances")


@pytest.mark.parametrize("code", sorted(ec2.CAPACITY_CODES))
def test_capacity_codes_are_capacity_errors(code: str, network: dict[str, str]) -> None:
    error = ec2.launch_error(client_error(code), make_request(make_pool(network)), REGION)
    assert ec2.is_capacity_error(code) and error.capacity is True
    assert f"{code}: {code} happened" in str(error)


@pytest.mark.parametrize(
    ("code", "hint"),
    [
        ("InvalidAMIID.NotFound", "ec2.ami"),
        ("InvalidAMIID.Malformed", "ec2.ami"),
        ("InstanceLimitExceeded", "Service Quotas"),
        ("VcpuLimitExceeded", "Service Quotas"),
        ("UnauthorizedOperation", "ec2:RunInstances"),
        ("InvalidParameterValue", "instance_type"),
        ("IdempotentParameterMismatch", "fresh node id"),
        ("SomethingNew", "Retry"),
    ],
)
def test_other_codes_are_mistakes_with_a_fix(code: str, hint: str, network: dict[str, str]) -> None:
    error = ec2.launch_error(client_error(code), make_request(make_pool(network)), REGION)
    assert not ec2.is_capacity_error(code) and error.capacity is False
    assert code in str(error) and hint in str(error)


def test_the_controller_launches_on_ec2_retires_a_silent_node_and_adopts_after_restart(
    tmp_path: Path, network: dict[str, str], aws: Any
) -> None:
    """`stoke controller --autoscale` with an ec2 pool, against moto: min_nodes launches an
    instance; it never registers (no stoke runs in moto), so after launch_timeout it is
    terminated and, after the backoff, launched again; a restarted controller adopts the
    instance it finds by its tags instead of launching another."""
    from cluster_fixtures import Admin, free_port, start_controller

    cluster = f"c{uuid.uuid4().hex[:10]}"
    policy = tmp_path / "ec2.yaml"
    policy.write_text(json.dumps({
        "pools": [{
            "name": "gpu", "provider": "ec2", "instance_type": "t3.micro", "market": "spot",
            "zones": [ZONE], "min_nodes": 1, "max_nodes": 2, "price_per_hour": 0.5,
            "ec2": {"ami": network["ami"], "subnet_id": network["subnet"]},
        }],
        "scaling": {"launch_timeout": "3s"},
    }))  # fmt: skip
    config = tmp_path / "controller.yaml"
    config.write_text(f"cluster_name: {cluster}\n")
    args = ("--autoscale", str(policy), "--config", str(config))
    port = free_port()

    def instances(state: str) -> dict[str, str]:
        found = {}
        pages = aws.get_paginator("describe_instances").paginate(
            Filters=[{"Name": "tag:stoke:cluster", "Values": [cluster]},
                     {"Name": "instance-state-name", "Values": [state]}]
        )  # fmt: skip
        for page in pages:
            for res in page["Reservations"]:
                for inst in res["Instances"]:
                    tags = {t["Key"]: t["Value"] for t in inst["Tags"]}
                    found[tags["stoke:node-id"]] = inst["InstanceId"]
        return found

    controller, url = start_controller(tmp_path / "home", port, *args)
    try:
        admin = Admin(url)
        _wait(lambda: "gpu-1" in instances("running"), "gpu-1 launched in EC2")
        _wait(lambda: "gpu-1" in instances("terminated"), "gpu-1 terminated: never registered")
        events = admin.http.get("/admin/autoscaler").json()["events"]
        assert any(e["action"] == "retire" and "never registered" in e["reason"] for e in events)
        _wait(lambda: "gpu-2" in instances("running"), "gpu-2 launched after the backoff")
    finally:
        controller.stop()
    assert "gpu-2" in instances("running")  # a cloud node outlives its controller
    controller, url = start_controller(tmp_path / "home", port, *args)
    try:
        admin = Admin(url)
        _wait(
            lambda: any(n["node_id"] == "gpu-2" for p in admin.http.get("/admin/autoscaler")
                        .json()["pools"] for n in p["nodes"]),
            "gpu-2 adopted",
        )  # fmt: skip
        launched = [e for e in admin.http.get("/admin/autoscaler").json()["events"]
                    if e["action"] == "launch"]  # fmt: skip
        assert launched == [] and sorted(instances("running")) == ["gpu-2"]
    finally:
        controller.stop()
        for instance_id in instances("running").values():
            aws.terminate_instances(InstanceIds=[instance_id])
