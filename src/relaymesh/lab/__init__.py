"""relaymesh.lab: real NAT topologies in network namespaces, and an in-memory twin."""
