# Shared set-up for the bats tests: commands from the checkout's venv.
bats_require_minimum_version 1.5.0
ROOT="$(cd "$BATS_TEST_DIRNAME/../.." && pwd)"
export PATH="$ROOT/.venv/bin:$PATH"
export VMBK_CONFIG_DIR="$BATS_TEST_TMPDIR/etc"
mkdir -p "$VMBK_CONFIG_DIR"

# A world-traversable directory for files QEMU/libvirt must read.
vm_tmpdir() {
  local d
  mkdir -p /var/tmp/vmbk-tests
  chmod 0711 /var/tmp/vmbk-tests
  d=$(mktemp -d /var/tmp/vmbk-tests/bats.XXXXXX)
  chmod 0755 "$d"
  echo "$d"
}

# Define (not start) a domain with one qcow2 disk; name is data.
define_domain() {
  local name="$1" dir="$2" xml
  qemu-img create -q -f qcow2 "$dir/disk.qcow2" 16M
  xml="$dir/domain.xml"
  python3 - "$name" "$dir/disk.qcow2" >"$xml" <<'PY'
import sys
from xml.sax.saxutils import escape
name, disk = sys.argv[1:]
print(f"""<domain type='qemu'><name>{escape(name)}</name><memory unit='MiB'>64</memory>
<os><type arch='x86_64'>hvm</type></os>
<devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
<source file='{escape(disk)}'/><target dev='vda' bus='virtio'/></disk></devices></domain>""")
PY
  virsh -q -c qemu:///system define "$xml" >/dev/null
}

undefine_domain() {
  virsh -q -c qemu:///system undefine "$1" --checkpoints-metadata >/dev/null 2>&1 || true
}
