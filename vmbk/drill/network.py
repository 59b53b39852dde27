"""The isolated network a drill's NICs are attached to.

No ``<forward>`` (libvirt's isolated mode: nothing is routed or NATed
out), no ``<ip>`` (the host has no address on the bridge, so no DHCP, no
DNS and no way to the host either) and a bridge name libvirt chooses.
Transient: it is gone when destroyed, and it carries the drill mark in
its metadata, so a later run removes one a killed drill left
(`vmbk.drill.leftovers`).  One network per drill: two drills at once do
not see each other.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Mapping
from typing import Any

from vmbk.drill.isolate import MARK_TAG
from vmbk.virt.connection import LibvirtError, libvirt_module


def network_xml(name: str, mark: Mapping[str, str]) -> str:
    root = ET.Element("network")
    ET.SubElement(root, "name").text = name
    ET.SubElement(ET.SubElement(root, "metadata"), MARK_TAG, dict(mark))
    ET.SubElement(root, "bridge", {"stp": "off", "delay": "0"})
    ET.SubElement(root, "dns", {"enable": "no"})
    return ET.tostring(root, encoding="unicode")


def create(conn: Any, name: str, mark: Mapping[str, str]) -> None:
    libvirt = libvirt_module()
    try:
        conn.networkCreateXML(network_xml(name, mark))
    except libvirt.libvirtError as e:
        raise LibvirtError(f"cannot create the isolated network {name}: {e.get_error_message()}") from None


def routes_out(conn: Any, name: str) -> bool:
    """Does the network ``name`` forward anywhere, or give the host an address on it?"""
    xml = conn.networkLookupByName(name).XMLDesc(0)
    root = ET.fromstring(xml)
    return root.find("forward") is not None or root.find("ip") is not None
