"""HaWebCluster: every Hetzner Cloud resource of the HA web front end, in one component.

Layout (names are Pulumi logical names, `<name>` is the component's name):

- `<name>-net` / `<name>-subnet`: one cloud network and one `cloud` subnet holding every
  server at a fixed private IP (VRRP runs unicast over it; web traffic LB -> web uses it).
- `<name>-lb-spread`, `<name>-web-spread[-k]`: spread placement groups, so the two LBs (and
  the web servers) never share a physical host. Hetzner allows 10 servers per group, so web
  servers are split into groups of 10.
- `<name>-lb-fw`, `<name>-web-fw`: firewalls on the public interfaces (Hetzner firewalls do
  not filter private networks): LBs take 80/443 from anywhere, SSH only from adminCidrs and
  ICMP; web servers take SSH from adminCidrs and ICMP, nothing else.
- `<name>-ssh`: the admin SSH key, installed on every server.
- `<name>-lb1`, `<name>-lb2`, `<name>-web1..N`: the servers.
- `<name>-fip` + `<name>-fip-lb1`: the IPv4 Floating IP and its initial assignment to lb1.
  keepalived moves it at runtime; `ignore_changes` keeps Pulumi from moving it back.
- `<name>-stats-password`, `<name>-vrrp-password`: generated when not configured.

After the servers exist the component hands them to `provision_cluster()` (components/
provision.py), which installs and configures the daemons over SSH (pulumi-command).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pulumi
import pulumi_hcloud as hcloud
import pulumi_random as random
import pulumi_tls as tls

from components.config import StackConfig
from components.day2 import SshRunner, drain_hook
from components.identity import ClusterIdentity
from components.provision import HostSteps, provision_cluster
from components.render import STATS_LOCAL_PORT

TYPE_TOKEN = "hcloud-ha-web:index:HaWebCluster"

ANYWHERE = ("0.0.0.0/0", "::/0")
#: Hetzner allows at most 10 servers in one spread placement group.
PLACEMENT_GROUP_MAX = 10
#: VRRPv2 PASS authentication uses at most 8 characters of the password.
VRRP_PASSWORD_LENGTH = 8
STATS_PASSWORD_LENGTH = 32
ACME_SEED_BYTES = 32
DNS_TTL = 300


def _as_int(value: str) -> int:
    return int(value)


def lb_firewall_rules(admin_cidrs: Sequence[str]) -> list[hcloud.FirewallRuleArgs]:
    """Inbound rules on the LBs' public interfaces: HTTP(S) from anywhere, SSH from admins."""
    return [
        hcloud.FirewallRuleArgs(
            direction="in",
            protocol="tcp",
            port="80",
            source_ips=list(ANYWHERE),
            description="HTTP to HAProxy",
        ),
        hcloud.FirewallRuleArgs(
            direction="in",
            protocol="tcp",
            port="443",
            source_ips=list(ANYWHERE),
            description="HTTPS (reserved for TLS termination)",
        ),
        *_admin_rules(admin_cidrs),
    ]


def web_firewall_rules(admin_cidrs: Sequence[str]) -> list[hcloud.FirewallRuleArgs]:
    """Inbound rules on the web servers' public interfaces: SSH from admins and ICMP only.

    Their HTTP is reached from the LBs over the private network, which Hetzner firewalls
    do not filter.
    """
    return _admin_rules(admin_cidrs)


def _admin_rules(admin_cidrs: Sequence[str]) -> list[hcloud.FirewallRuleArgs]:
    return [
        hcloud.FirewallRuleArgs(
            direction="in",
            protocol="tcp",
            port="22",
            source_ips=list(admin_cidrs),
            description="SSH from adminCidrs",
        ),
        hcloud.FirewallRuleArgs(
            direction="in",
            protocol="icmp",
            source_ips=list(ANYWHERE),
            description="ICMP (ping, path MTU discovery)",
        ),
    ]


class HaWebCluster(pulumi.ComponentResource):
    """Network, firewalls, servers and the Floating IP of the HA web front end.

    Attributes (all available right after construction):
      servers: hcloud.Server per name ("lb1", "lb2", "web1", ...).
      floating_ip: the Floating IP address; site_url / stats_url built on it.
      public_ipv4 / private_ip / server_id: dicts keyed by server name.
      stats_user: plain str; stats_password / vrrp_password: secret outputs.
      provisioned: the remote steps provision_cluster() created, per server name.
    """

    floating_ip: pulumi.Output[str]
    site_url: pulumi.Output[str]
    stats_url: pulumi.Output[str]
    stats_password: pulumi.Output[str]
    vrrp_password: pulumi.Output[str]
    ssh_public_key: pulumi.Output[str]
    ssh_private_key: pulumi.Output[str]

    def __init__(
        self,
        name: str,
        stack: StackConfig,
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        super().__init__(TYPE_TOKEN, name, None, opts)
        s = stack.settings
        cluster = s.cluster_name

        def labels(role: str, **extra: str) -> dict[str, str]:
            return {"cluster": cluster, "role": role, **extra}

        def child(
            depends_on: list[pulumi.Resource] | None = None,
            ignore_changes: list[str] | None = None,
        ) -> pulumi.ResourceOptions:
            return pulumi.ResourceOptions(
                parent=self, depends_on=depends_on, ignore_changes=ignore_changes
            )

        # --- secrets: configured, or generated once and kept in state -----------------
        self.stats_password = pulumi.Output.secret(
            stack.secrets.stats_password
            if stack.secrets.stats_password is not None
            else random.RandomPassword(
                f"{name}-stats-password",
                length=STATS_PASSWORD_LENGTH,
                special=False,
                opts=child(),
            ).result
        )
        self.vrrp_password = pulumi.Output.secret(
            stack.secrets.vrrp_password
            if stack.secrets.vrrp_password is not None
            else random.RandomPassword(
                f"{name}-vrrp-password",
                length=VRRP_PASSWORD_LENGTH,
                special=False,
                opts=child(),
            ).result
        )
        self.stats_user = s.stats_user
        # SSH: the configured pair, or an ED25519 pair generated once and kept in the state
        # (pulumi-tls marks the private halves secret outputs).
        self.generated_ssh_key: tls.PrivateKey | None = None
        if stack.secrets.ssh_private_key is not None:
            self.ssh_public_key = pulumi.Output.from_input(s.ssh_public_key)
            self.ssh_private_key = pulumi.Output.secret(stack.secrets.ssh_private_key)
        else:
            self.generated_ssh_key = tls.PrivateKey(
                f"{name}-ssh-key",
                tls.PrivateKeyArgs(algorithm="ED25519"),
                opts=child(),
            )
            self.ssh_public_key = self.generated_ssh_key.public_key_openssh.apply(str.strip)
            self.ssh_private_key = pulumi.Output.secret(self.generated_ssh_key.private_key_openssh)
        # The ACME account key both LBs share (see components/acme_account.py): 32 random
        # bytes kept as a secret in state; the key itself is derived at render time.
        self.acme_account_seed: pulumi.Output[str] | None = None
        if s.domains:
            self.acme_account_seed = pulumi.Output.secret(
                random.RandomBytes(
                    f"{name}-acme-account-seed", length=ACME_SEED_BYTES, opts=child()
                ).base64
            )
        else:
            pulumi.log.warn(
                "domains is empty: the site is served over plain HTTP only and the stats "
                "page only on each LB's localhost. Set domains and acmeEmail for HTTPS."
            )

        # --- what cannot roll: refused before anything changes (components/identity.py)
        self.identity = ClusterIdentity(f"{name}-identity", s, opts=child())

        # --- network -----------------------------------------------------------------
        self.network = hcloud.Network(
            f"{name}-net",
            name=f"{cluster}-net",
            ip_range=s.network_cidr,
            labels=labels("network"),
            opts=child(depends_on=[self.identity]),
        )
        self.subnet = hcloud.NetworkSubnet(
            f"{name}-subnet",
            network_id=self.network.id.apply(_as_int),
            type="cloud",
            network_zone=s.network_zone,
            ip_range=s.subnet_cidr,
            opts=child(),
        )

        # --- placement groups (spread: one physical host per server) -------------------
        self.lb_placement_group = hcloud.PlacementGroup(
            f"{name}-lb-spread",
            name=f"{cluster}-lb",
            type="spread",
            labels=labels("lb"),
            opts=child(depends_on=[self.identity]),
        )
        self.web_placement_groups: list[hcloud.PlacementGroup] = []
        group_count = -(-s.web_count // PLACEMENT_GROUP_MAX)
        for k in range(group_count):
            suffix = "" if k == 0 else f"-{k + 1}"
            self.web_placement_groups.append(
                hcloud.PlacementGroup(
                    f"{name}-web-spread{suffix}",
                    name=f"{cluster}-web{suffix}",
                    type="spread",
                    labels=labels("web"),
                    opts=child(depends_on=[self.identity]),
                )
            )

        # --- firewalls (public interfaces only) ----------------------------------------
        self.lb_firewall = hcloud.Firewall(
            f"{name}-lb-fw",
            name=f"{cluster}-lb",
            rules=lb_firewall_rules(s.admin_cidrs),
            labels=labels("lb"),
            opts=child(depends_on=[self.identity]),
        )
        self.web_firewall = hcloud.Firewall(
            f"{name}-web-fw",
            name=f"{cluster}-web",
            rules=web_firewall_rules(s.admin_cidrs),
            labels=labels("web"),
            opts=child(depends_on=[self.identity]),
        )

        # --- SSH key -----------------------------------------------------------------
        self.ssh_key = hcloud.SshKey(
            f"{name}-ssh",
            name=f"{cluster}-admin",
            public_key=self.ssh_public_key,
            labels=labels("admin"),
            # Names are unique per project: the old key goes before the new one is made.
            # Servers ignore later key changes (keys rotate on the hosts), so replacing
            # this key replaces no server.
            opts=pulumi.ResourceOptions(
                parent=self, depends_on=[self.identity], delete_before_replace=True
            ),
        )

        # --- Floating IP, initially on lb1; keepalived owns it afterwards ------------------
        self.floating_ip_resource = hcloud.FloatingIp(
            f"{name}-fip",
            name=f"{cluster}-vip",
            type="ipv4",
            home_location=s.location,
            description=f"{cluster}: site address, moved between lb1 and lb2 by keepalived",
            labels=labels("lb"),
            opts=child(depends_on=[self.identity]),
        )

        # --- servers, each followed by its remote steps -------------------------------
        plan: dict[str, tuple[str, str, hcloud.PlacementGroup, hcloud.Firewall]] = {}
        for server_name, ip in zip(s.lb_names, s.lb_ips, strict=True):
            plan[server_name] = ("lb", ip, self.lb_placement_group, self.lb_firewall)
        for i, (server_name, ip) in enumerate(zip(s.web_names, s.web_ips, strict=True)):
            group = self.web_placement_groups[i // PLACEMENT_GROUP_MAX]
            plan[server_name] = ("web", ip, group, self.web_firewall)
        ssh = SshRunner(self.ssh_private_key)
        step_deps: list[pulumi.Resource] = [self.subnet]
        self.servers: dict[str, hcloud.Server] = {}

        def make_server(server_name: str, gate: Sequence[pulumi.Resource]) -> hcloud.Server:
            role, ip, group, firewall = plan[server_name]
            resource_name = f"{name}-{server_name}"
            server = hcloud.Server(
                resource_name,
                name=f"{cluster}-{server_name}",
                server_type=s.server_type,
                image=s.image,
                location=s.location,
                placement_group_id=group.id.apply(_as_int),
                firewall_ids=[firewall.id.apply(_as_int)],
                ssh_keys=[self.ssh_key.id],
                labels=labels(role, server=server_name),
                public_nets=[hcloud.ServerPublicNetArgs(ipv4_enabled=True, ipv6_enabled=True)],
                # subnet_id (not network_id) pins the subnet and makes the server wait for
                # it: attaching a fixed IP before the subnet exists fails. The provider
                # rejects network_id and subnet_id together. alias_ips=[] avoids a
                # detach/attach on every update (provider docs).
                networks=[hcloud.ServerNetworkArgs(subnet_id=self.subnet.id, ip=ip, alias_ips=[])],
                opts=pulumi.ResourceOptions(
                    parent=self,
                    # The turn of the previous servers must be over (rolling changes).
                    depends_on=[self.subnet, self.identity, *gate],
                    # Name and private IP are unique: the old server must give them up
                    # before its successor is created.
                    delete_before_replace=True,
                    # Keys rotate on the hosts (the keys step); a new key list must not
                    # replace every server.
                    ignore_changes=["sshKeys"],
                    # A resize powers the server off: it hands over first.
                    hooks=pulumi.ResourceHookBinding(
                        before_update=[drain_hook(resource_name, role, s, ssh)]
                    ),
                ),
            )
            self.servers[server_name] = server
            if server_name == "lb1":
                self.floating_ip_assignment = hcloud.FloatingIpAssignment(
                    f"{name}-fip-lb1",
                    floating_ip_id=self.floating_ip_resource.id.apply(_as_int),
                    server_id=server.id.apply(_as_int),
                    # keepalived moves the address at runtime; a replaced lb1 must not
                    # take it back either (ignore_changes also holds in the engine's
                    # delete-before-replace cascade, which diffs with ignoreChanges).
                    opts=child(ignore_changes=["server_id"]),
                )
                # lb1 holds the address before keepalived starts (first deployment).
                step_deps.append(self.floating_ip_assignment)
            return server

        # --- DNS: A records + reverse DNS of the floating IP (with dnsZone) ---------------
        self.floating_ip = self.floating_ip_resource.ip_address
        self.dns_records: pulumi.Output[dict[str, str]] = self.floating_ip.apply(
            lambda ip: {d: ip for d in s.domains}
        )
        self.zone_rrsets: list[hcloud.ZoneRrset] = []
        self.rdns: hcloud.Rdns | None = None
        if s.dns_zone:
            for domain in s.domains:
                relative = "@" if domain == s.dns_zone else domain[: -len(s.dns_zone) - 1]
                self.zone_rrsets.append(
                    hcloud.ZoneRrset(
                        f"{name}-dns-{domain}",
                        zone=s.dns_zone,
                        name=relative,
                        type="A",
                        ttl=DNS_TTL,
                        records=[hcloud.ZoneRrsetRecordArgs(value=self.floating_ip)],
                        labels=labels("dns"),
                        opts=child(),
                    )
                )
            self.rdns = hcloud.Rdns(
                f"{name}-fip-rdns",
                floating_ip_id=self.floating_ip_resource.id.apply(_as_int),
                ip_address=self.floating_ip,
                dns_ptr=s.domains[0],
                opts=child(),
            )

        # Remote steps per server. They wait for the subnet (private IP attached); a
        # deployed cluster changes one turn at a time (components/provision.py).
        # The A records come first: issuance on the first `pulumi up` needs them. (The
        # list grows: lb1's floating IP assignment joins it once lb1 exists.)
        step_deps.extend(self.zone_rrsets)
        self.provisioned: Mapping[str, HostSteps] = provision_cluster(
            parent=self,
            name=name,
            stack=stack,
            make_server=make_server,
            floating_ip=self.floating_ip_resource,
            stats_password=self.stats_password,
            vrrp_password=self.vrrp_password,
            acme_account_seed=self.acme_account_seed,
            depends_on=step_deps,
            rolling=deployed(cluster),
            alert_webhook_url=stack.secrets.alert_webhook_url,
            ssh_private_key=self.ssh_private_key,
            ssh_public_key=self.ssh_public_key,
        )

        # --- outputs -----------------------------------------------------------------
        if s.domains:
            primary = s.domains[0]
            self.site_url = pulumi.Output.from_input(f"https://{primary}/")
            self.stats_url = pulumi.Output.from_input(
                f"https://{primary}/haproxy?stats (from adminCidrs only)"
            )
        else:
            self.site_url = self.floating_ip.apply(lambda ip: f"http://{ip}/")
            self.stats_url = pulumi.Output.from_input(
                f"http://127.0.0.1:{STATS_LOCAL_PORT}/haproxy?stats on each LB, through "
                f"ssh -L {STATS_LOCAL_PORT}:127.0.0.1:{STATS_LOCAL_PORT} root@<LB public IP>"
            )
        self.public_ipv4: dict[str, pulumi.Output[str]] = {
            n: srv.ipv4_address for n, srv in self.servers.items()
        }
        self.private_ip: dict[str, pulumi.Output[str]] = {
            n: srv.networks.apply(_first_private_ip) for n, srv in self.servers.items()
        }
        self.server_id: dict[str, pulumi.Output[int]] = {
            n: srv.id.apply(_as_int) for n, srv in self.servers.items()
        }

        self.register_outputs(
            {
                "floating_ip": self.floating_ip,
                "site_url": self.site_url,
                "stats_url": self.stats_url,
                "dns_records": self.dns_records,
                "public_ipv4": self.public_ipv4,
                "private_ip": self.private_ip,
                "server_id": self.server_id,
                "stats_user": self.stats_user,
                "stats_password": self.stats_password,
                "ssh_public_key": self.ssh_public_key,
                "ssh_private_key": self.ssh_private_key,
            }
        )


def deployed(cluster: str) -> bool:
    """Whether servers of this cluster exist already (Hetzner's server list, by label).

    A deployed cluster changes one turn at a time (rolling); a first deployment creates
    every server in parallel. The servers' `depends_on` differs between the two, which
    the engine records but never diffs: it changes no resource.
    """
    found = hcloud.get_servers(with_selector=f"cluster={cluster}")
    return bool(found.servers)


def _first_private_ip(networks: Sequence[hcloud.outputs.ServerNetwork] | None) -> str:
    """The server's address in the cluster network (it is attached to exactly one)."""
    for net in networks or ():
        if net.ip:
            return net.ip
    return ""
