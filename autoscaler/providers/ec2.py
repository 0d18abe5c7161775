"""The `ec2` provider: one EC2 instance per stoke node, on-demand or spot, found again by its tags.

Every instance carries `stoke:cluster`, `stoke:pool` and `stoke:node-id` tags (set atomically at
launch), so after a controller restart `list_nodes` rebuilds the picture from EC2 itself: the
tags are the persisted facts, the instance state gives the status. A launch is idempotent per
node id twice over: the `ClientToken` is derived from (cluster, node id), and before launching
the provider looks for a live instance already tagged with that node id (moto, which the tests
run against, ignores client tokens; AWS forgets them after a while).

The instance's user data is a shell script that cloud-init runs as root at first boot: it
exports `STOKE_SECRET`, `STOKE_CONTROLLER`, `STOKE_NODE_ID`, `STOKE_POOL` and `STOKE_CLUSTER`,
reads the instance's private IP from the metadata service (IMDSv2) and `exec`s `stoke node` (the
AMI must have `stoke` on root's PATH). A pool's own `ec2.user_data` (it must start with `#!`)
gets the export lines right after its first line and starts the node itself.

The shared secret travels in the user data. On the instance, only the metadata service serves
it: instances are launched with IMDSv2 required and a hop limit of 1, so containers on the node
cannot read it; outside, anyone allowed `ec2:DescribeInstanceAttribute` can. To keep it out of
reach, deny that action to everyone but the operators, and rotate the secret when a node image
or role leaks (a setting that fetches it from SSM Parameter Store instead is not built yet).

Credentials, the default region and the endpoint come from the standard AWS configuration
(`AWS_PROFILE`, `AWS_ACCESS_KEY_ID`, `AWS_DEFAULT_REGION`, `AWS_ENDPOINT_URL`, an instance role).
"""

from __future__ import annotations

import hashlib
import logging
import shlex
import threading
from collections.abc import Iterable
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from autoscaler.policy import Ec2Settings, Market, Pool
from autoscaler.providers.base import LaunchError, LaunchRequest, NodeStatus, ProviderNode

log = logging.getLogger(__name__)

IMDS = "http://169.254.169.254"
NODE_PORT = 7071
USER_DATA_LIMIT = 16384
"""Bytes of user data EC2 accepts before base64."""

TAG_CLUSTER, TAG_POOL, TAG_NODE = "stoke:cluster", "stoke:pool", "stoke:node-id"

STATUS = {
    "pending": NodeStatus.PENDING,
    "running": NodeStatus.RUNNING,
    "stopping": NodeStatus.GONE,
    "stopped": NodeStatus.GONE,
    "shutting-down": NodeStatus.GONE,
}
"""EC2 instance states listed, and what they mean to stoke (terminated instances are skipped)."""

CAPACITY_CODES = frozenset(
    {
        "InsufficientInstanceCapacity",
        "InsufficientCapacity",
        "InsufficientHostCapacity",
        "SpotMaxPriceTooLow",
        "MaxSpotInstanceCountExceeded",
        "Unsupported",  # this instance type (or spot for it) is not offered in this zone now
    }
)
"""RunInstances error codes that mean "no capacity of this kind here now": the pool falls back
(another zone, on-demand) instead of retrying the same launch."""


class Ec2Error(RuntimeError):
    """Listing or terminating instances failed; the message names the cause and the fix."""


def is_capacity_error(code: str) -> bool:
    """True when an EC2 error code means a capacity shortage rather than a mistake to fix."""
    return code in CAPACITY_CODES


def client_token(cluster: str, node_id: str) -> str:
    """RunInstances' idempotency token for a node: the same node id never launches twice."""
    digest = hashlib.sha256(f"{cluster}/{node_id}".encode()).hexdigest()
    return f"stoke-{digest[:40]}"  # EC2 allows 64 ASCII characters


class Ec2Provider:
    """Nodes of a cluster as EC2 instances, in the default region and any a pool names.

    `list_nodes` covers the default region, the `regions` given, and every region launched in
    since; after a restart, pass the regions of the policy's ec2 pools (`for_pools`) so nodes in
    them are found again."""

    name = "ec2"

    def __init__(
        self,
        cluster: str,
        region: str | None = None,
        endpoint_url: str | None = None,
        regions: Iterable[str] = (),
    ) -> None:
        self.cluster = cluster
        self._endpoint_url = endpoint_url
        self._session = boto3.session.Session(region_name=region)
        self.default_region: str | None = self._session.region_name
        known = [self.default_region, *regions] if self.default_region else list(regions)
        self._regions = dict.fromkeys(known)  # an ordered set
        self._clients: dict[str, Any] = {}
        self._instance_region: dict[str, str] = {}
        self._lock = threading.Lock()  # boto3 sessions are not thread-safe; clients are

    @classmethod
    def for_pools(
        cls, cluster: str, pools: Iterable[Pool], endpoint_url: str | None = None
    ) -> Ec2Provider:
        """A provider that lists nodes in every region the ec2 pools name."""
        regions = [p.ec2.region for p in pools if p.ec2 is not None and p.ec2.region]
        return cls(cluster, endpoint_url=endpoint_url, regions=regions)

    # -- the Provider contract ---------------------------------------------------------------

    def launch(self, request: LaunchRequest) -> ProviderNode:
        """Run one instance for `request` (or return the live one already tagged with its node
        id). Raises LaunchError, `capacity=True` when EC2 has no capacity of this kind now."""
        region = self._region_for(request.pool)
        params = self._run_params(request)
        client = self._client(region)
        try:
            existing = self._describe(client, request.node_id)
            if existing:
                log.info("ec2: node %s already launched as %s", request.node_id, existing[0])
                return self._node(existing[0], region)
            reply = client.run_instances(**params)
        except (ClientError, BotoCoreError) as exc:
            raise launch_error(exc, request, region) from None
        instance = reply["Instances"][0]
        log.info("ec2: launched node %s as %s", request.node_id, instance["InstanceId"])
        return self._node(instance, region)

    def list_nodes(self) -> list[ProviderNode]:
        """Every instance of this cluster not terminated, in every region known (see class)."""
        if not self._regions:
            raise Ec2Error(
                "ec2: no AWS region to list nodes in: set AWS_DEFAULT_REGION (or AWS_REGION), "
                "or give each ec2 pool `ec2.region`"
            )
        nodes: list[ProviderNode] = []
        for region in list(self._regions):
            try:
                instances = self._describe(self._client(region))
            except (ClientError, BotoCoreError) as exc:
                raise Ec2Error(f"ec2: listing instances in {region}: {describe(exc)}") from None
            nodes.extend(self._node(i, region) for i in instances)
        return nodes

    def terminate(self, node: ProviderNode) -> None:
        """Terminate `node`'s instance; an instance already gone is fine."""
        region = self._instance_region.get(node.provider_id)
        regions = [region] if region else list(self._regions)
        if not regions:
            raise Ec2Error(
                f"ec2: no AWS region to terminate {node.provider_id} in: set AWS_DEFAULT_REGION "
                "(or AWS_REGION), or give each ec2 pool `ec2.region`"
            )
        for name in regions:
            try:
                self._client(name).terminate_instances(InstanceIds=[node.provider_id])
                log.info("ec2: terminated node %s (%s)", node.node_id, node.provider_id)
                return
            except (ClientError, BotoCoreError) as exc:
                if _code(exc) != "InvalidInstanceID.NotFound":
                    raise Ec2Error(
                        f"ec2: terminating {node.provider_id} (node {node.node_id}) in {name}: "
                        f"{describe(exc)}"
                    ) from None
        # Not found in any region: already terminated and forgotten by EC2, which is the goal.

    def close(self) -> None:
        """Nothing to stop: instances outlive the controller, which finds them again."""
        with self._lock:
            for client in self._clients.values():
                client.close()
            self._clients.clear()

    # -- steps ---------------------------------------------------------------------------------

    def _region_for(self, pool: Pool) -> str:
        region = (pool.ec2.region if pool.ec2 else None) or self.default_region
        if region is None:
            raise LaunchError(
                f"pool {pool.name}: no AWS region: set `ec2.region` in the pool, or "
                "AWS_DEFAULT_REGION in the controller's environment"
            )
        return region

    def _client(self, region: str) -> Any:
        """The EC2 client for `region` (boto3 clients are thread-safe; sessions are not)."""
        with self._lock:
            if region not in self._clients:
                # Attempts: AWS_MAX_ATTEMPTS or the AWS config file (standard mode: 3).
                config = Config(retries={"mode": "standard"}, connect_timeout=10)
                self._clients[region] = self._session.client(
                    "ec2", region_name=region, endpoint_url=self._endpoint_url, config=config
                )
                self._regions[region] = None
            return self._clients[region]

    def _run_params(self, request: LaunchRequest) -> dict[str, Any]:
        """RunInstances' arguments for one node."""
        pool, settings = request.pool, _settings(request)
        tags = {"Name": f"stoke-{self.cluster}-{request.node_id}", **settings.tags}
        tags.update({TAG_CLUSTER: self.cluster, TAG_POOL: pool.name, TAG_NODE: request.node_id})
        tag_list = [{"Key": k, "Value": v} for k, v in tags.items()]
        params: dict[str, Any] = {
            "MinCount": 1,
            "MaxCount": 1,
            "ImageId": settings.ami,
            "InstanceType": pool.instance_type,
            "Placement": {"AvailabilityZone": request.zone},
            "UserData": user_data(request, self.cluster),
            "ClientToken": client_token(self.cluster, request.node_id),
            "MetadataOptions": {"HttpTokens": "required", "HttpPutResponseHopLimit": 1},
            "TagSpecifications": [
                {"ResourceType": "instance", "Tags": tag_list},
                {"ResourceType": "volume", "Tags": tag_list},
            ],
        }
        if settings.subnet_id:
            params["SubnetId"] = settings.subnet_id
        if settings.security_group_ids:
            params["SecurityGroupIds"] = list(settings.security_group_ids)
        if settings.key_name:
            params["KeyName"] = settings.key_name
        if pool.market == Market.SPOT:
            params["InstanceMarketOptions"] = {
                "MarketType": "spot",
                "SpotOptions": {
                    "SpotInstanceType": "one-time",
                    "InstanceInterruptionBehavior": "terminate",
                },
            }
        return params

    def _describe(self, client: Any, node_id: str | None = None) -> list[dict[str, Any]]:
        """This cluster's instances not terminated (only `node_id`'s when given)."""
        filters = [
            {"Name": f"tag:{TAG_CLUSTER}", "Values": [self.cluster]},
            {"Name": "instance-state-name", "Values": list(STATUS)},
        ]
        if node_id is not None:
            filters.append({"Name": f"tag:{TAG_NODE}", "Values": [node_id]})
        instances = []
        for page in client.get_paginator("describe_instances").paginate(Filters=filters):
            for reservation in page["Reservations"]:
                instances.extend(reservation["Instances"])
        return [i for i in instances if i["State"]["Name"] in STATUS and _tags(i).get(TAG_NODE)]

    def _node(self, instance: dict[str, Any], region: str) -> ProviderNode:
        tags = _tags(instance)
        self._instance_region[instance["InstanceId"]] = region
        return ProviderNode(
            node_id=tags[TAG_NODE],
            pool=tags.get(TAG_POOL, ""),
            zone=instance.get("Placement", {}).get("AvailabilityZone", ""),
            provider_id=instance["InstanceId"],
            status=STATUS.get(instance["State"]["Name"], NodeStatus.GONE),
            launched_unix=instance["LaunchTime"].timestamp(),
        )


# -- user data -------------------------------------------------------------------------------


def user_data(request: LaunchRequest, cluster: str) -> str:
    """The shell script cloud-init runs at first boot (see the module docstring)."""
    settings = _settings(request)
    exports = "".join(
        f"export {name}={shlex.quote(value)}\n"
        for name, value in (
            ("STOKE_SECRET", request.secret),
            ("STOKE_CONTROLLER", request.controller_address),
            ("STOKE_NODE_ID", request.node_id),
            ("STOKE_POOL", request.pool.name),
            ("STOKE_CLUSTER", cluster),
        )
    )
    if settings.user_data is None:
        script = f"#!/bin/sh\n{_HEADER}set -eu\n{exports}{_start_node(settings.node_args)}"
    else:
        first, _, rest = settings.user_data.partition("\n")
        if not first.startswith("#!"):
            raise LaunchError(
                f"pools.{request.pool.name}.ec2.user_data must be a shell script starting with "
                "'#!' (stoke puts its `export STOKE_*=` lines after that line)"
            )
        script = f"{first}\n{exports}{rest}"
    if len(script.encode()) > USER_DATA_LIMIT:
        raise LaunchError(
            f"pools.{request.pool.name}.ec2: the user data is {len(script.encode())} bytes, over "
            f"EC2's {USER_DATA_LIMIT}: shorten `user_data` or `node_args`"
        )
    return script


_HEADER = (
    "# Written by stoke's ec2 provider: start `stoke node` for this cluster's controller.\n"
    "# The secret below is readable here through the metadata service (IMDSv2, hop limit 1)\n"
    "# and by AWS principals allowed ec2:DescribeInstanceAttribute.\n"
)


def _start_node(node_args: list[str]) -> str:
    """The script's tail: the private IP from IMDSv2, then `exec stoke node`."""
    curl = "curl -fsS --retry 10 --retry-connrefused --retry-delay 1"
    argv = [
        "--listen", f"0.0.0.0:{NODE_PORT}",
        "--preemption", "aws",
        "--exit-when-drained",
    ]  # fmt: skip
    return (
        f"token=$({curl} -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 300' "
        f"{IMDS}/latest/api/token)\n"
        f'address=$({curl} -H "X-aws-ec2-metadata-token: $token" '
        f"{IMDS}/latest/meta-data/local-ipv4)\n"
        'exec stoke node --controller "$STOKE_CONTROLLER" --node-id "$STOKE_NODE_ID" '
        f'--advertise "$address:{NODE_PORT}" {shlex.join([*argv, *node_args])}\n'
    )


# -- errors ----------------------------------------------------------------------------------


def launch_error(exc: Exception, request: LaunchRequest, region: str) -> LaunchError:
    """A LaunchError for a failed RunInstances (or its idempotency lookup) that names the fix."""
    code = _code(exc)
    where = f"ec2: launching node {request.node_id} of pool {request.pool.name} in {request.zone}"
    if code is not None and is_capacity_error(code):
        return LaunchError(f"{where}: no capacity now ({describe(exc)})", capacity=True)
    return LaunchError(f"{where}: {describe(exc)}. {_hint(code, request, region)}")


def describe(exc: Exception) -> str:
    """`Code: message` for an EC2 error, the class and text for anything else."""
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        return f"{error.get('Code', '?')}: {error.get('Message', '')}".rstrip(": ")
    return f"{type(exc).__name__}: {exc}"


def _hint(code: str | None, request: LaunchRequest, region: str) -> str:
    pool, settings = request.pool, _settings(request)
    key = f"pools.{pool.name}"
    hints = {
        "InvalidAMIID": f"AMI {settings.ami} is not usable in {region} (AMIs are per region): "
        f"fix {key}.ec2.ami",
        "InstanceLimitExceeded": f"the account's quota for {pool.instance_type} in {region} is "
        f"used up: request an increase in Service Quotas or lower {key}.max_nodes",
        "VcpuLimitExceeded": f"the account's vCPU quota in {region} is used up: request an "
        f"increase in Service Quotas or lower {key}.max_nodes",
        "UnauthorizedOperation": "the AWS credentials may not do this: allow ec2:RunInstances, "
        "ec2:CreateTags, ec2:DescribeInstances and ec2:TerminateInstances",
        "AuthFailure": "the AWS credentials are refused: check AWS_PROFILE or the keys",
        "InvalidSubnetID": f"subnet {settings.subnet_id} does not exist in {region}: "
        f"fix {key}.ec2.subnet_id",
        "InvalidGroup": f"a security group in {settings.security_group_ids} does not exist in "
        f"{region}: fix {key}.ec2.security_group_ids",
        "InvalidKeyPair": f"key pair {settings.key_name!r} does not exist in {region}: "
        f"fix {key}.ec2.key_name",
        "InvalidInstanceType": f"check {key}.instance_type: {pool.instance_type} is not an "
        f"EC2 instance type offered in {region}",
        "InvalidParameterValue": f"check {key}.instance_type, {key}.zones and the `ec2:` settings",
        "InvalidParameterCombination": f"check {key}.instance_type against {key}.ec2 (subnet "
        "and zone must match)",
        "IdempotentParameterMismatch": f"node id {request.node_id} was launched before with "
        "other settings: launch it under a fresh node id",
    }
    if code is None:
        return _transport_hint(region)
    return hints.get(code.split(".")[0], "Retry; if it persists, check the pool's `ec2:` settings")


def _transport_hint(region: str) -> str:
    return (
        f"Check that EC2 in {region} is reachable (AWS_ENDPOINT_URL, network) and that AWS "
        "credentials are configured (AWS_PROFILE, AWS_ACCESS_KEY_ID, or an instance role)"
    )


def _code(exc: Exception) -> str | None:
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code", "?"))
    return None


def _settings(request: LaunchRequest) -> Ec2Settings:
    if request.pool.ec2 is None:
        raise LaunchError(f"pool {request.pool.name} has no `ec2:` settings; add at least `ami`")
    return request.pool.ec2


def _tags(instance: dict[str, Any]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
