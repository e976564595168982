"""hcloud-ha-web: settings -> HaWebCluster -> stack outputs. Logic lives in components/."""

import pulumi

from components.cluster import HaWebCluster
from components.config import load_settings

stack = load_settings()
cluster = HaWebCluster(stack.settings.cluster_name, stack)

pulumi.export("floating_ip", cluster.floating_ip)
pulumi.export("site_url", cluster.site_url)
pulumi.export("stats_url", cluster.stats_url)
pulumi.export("dns_records", cluster.dns_records)
pulumi.export("stats_user", cluster.stats_user)
pulumi.export("stats_password", cluster.stats_password)
pulumi.export("public_ipv4", cluster.public_ipv4)
pulumi.export("private_ip", cluster.private_ip)
pulumi.export("server_id", cluster.server_id)
# `make ssh` and `make status` log in with the stack's key (generated unless configured).
pulumi.export("ssh_public_key", cluster.ssh_public_key)
pulumi.export("ssh_private_key", cluster.ssh_private_key)
