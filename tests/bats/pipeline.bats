#!/usr/bin/env bats
# Real pipes between real commands, on a real libvirt domain whose name is
# hostile (spaces, quotes, unicode, dots).

load helpers

setup() {
  DIR=$(vm_tmpdir)
  NAME="bats vm 'q' \"dq\" ü ..$$"
  define_domain "$NAME" "$DIR"
}

teardown() {
  undefine_domain "$NAME"
  rm -rf "$DIR"
}

@test "discover emits the domain with its facts" {
  run --separate-stderr vmbk-discover --json --vm "$NAME"
  [ "$status" -eq 0 ]
  [ "$(jq -r .type <<<"$output")" = vm ]
  [ "$(jq -r .name <<<"$output")" = "$NAME" ]
  [ "$(jq -r .state <<<"$output")" = "shut off" ]
  [ "$(jq -r '.disks[0].target' <<<"$output")" = vda ]
  [ "$(jq -r '.disks[0].source' <<<"$output")" = "$DIR/disk.qcow2" ]
  [ "$(jq -r '.disks[0].virtual_size' <<<"$output")" = 16777216 ]
  [ "$(jq -r .v <<<"$output")" = 1 ]
  [ -n "$(jq -r .session <<<"$output")" ]
}

@test "an unknown VM is an error record and exit 5; known ones still come out" {
  run --separate-stderr vmbk-discover --json --vm "no-such-vm-$$"
  [ "$status" -eq 5 ]
  [ "$(jq -r .type <<<"$output")" = error ]
  [ "$(jq -r .kind <<<"$output")" = vm ]
  run --separate-stderr vmbk-discover --json --vm "no-such-vm-$$" --vm "$NAME"
  [ "$status" -eq 9 ]
  [ "$(jq -s 'map(.type) | join(",")' <<<"$output")" = '"error,vm"' ]
}

@test "records a stage does not handle pass through unchanged" {
  vmbk-discover --json --vm "$NAME" > "$BATS_TEST_TMPDIR/in.jsonl"
  run --separate-stderr bash -c 'vmbk-rotate --json --backup-path "$1" < "$2"' _ "$BATS_TEST_TMPDIR" "$BATS_TEST_TMPDIR/in.jsonl"
  [ "$status" -eq 0 ]
  [ "$output" = "$(cat "$BATS_TEST_TMPDIR/in.jsonl")" ]
}

@test "an error record flowing down the pipe sets the last stage's exit code" {
  run --separate-stderr bash -c 'vmbk-discover --json --vm "nope-$$" | vmbk-rotate --json --backup-path "$1"' _ "$BATS_TEST_TMPDIR"
  [ "$status" -eq 5 ]
  [ "$(jq -r .stage <<<"$output")" = vmbk-discover ]
}

@test "discover | plan --now: a planned copy in the week's period, session carried" {
  printf 'policy = "weekly"\n' > "$VMBK_CONFIG_DIR/default.toml"
  mkdir -p "$BATS_TEST_TMPDIR/backups"
  run --separate-stderr bash -c 'vmbk-discover --json --vm "$1" | vmbk-plan --json --backup-path "$2" --now 2026-11-18T01:00:00Z' \
    _ "$NAME" "$BATS_TEST_TMPDIR/backups"
  [ "$status" -eq 0 ]
  [ "$(jq -r .type <<<"$output")" = plan ]
  [ "$(jq -r .name <<<"$output")" = "$NAME" ]
  [ "$(jq -r .action <<<"$output")" = copy ]
  [ "$(jq -r .period <<<"$output")" = 2026-W47 ]
  [ "$(jq -r .target_dir <<<"$output")" = "$BATS_TEST_TMPDIR/backups/$NAME/2026-W47" ]
  [ "$(jq -r '.disks[0].mode' <<<"$output")" = copy ]
  [ "$(jq -r '.vm.name' <<<"$output")" = "$NAME" ]
  [ "$(jq -r .session <<<"$output")" = "$(jq -r .vm.session <<<"$output")" ]
  # plan writes nothing
  [ -z "$(ls -A "$BATS_TEST_TMPDIR/backups")" ]
}

@test "on a terminal: a readable table; --json forces JSON lines" {
  export VMNAME="$NAME"  # through the environment: the name has quotes
  run script -qec 'vmbk-discover --vm "$VMNAME"' /dev/null
  [ "$status" -eq 0 ]
  [[ "$output" == *NAME*STATE*POLICY* ]]
  [[ "$output" == *"shut off"* ]]
  [[ "$output" != *"{"* ]]
  run script -qec 'vmbk-discover --json --vm "$VMNAME"' /dev/null
  [[ "$output" == *'"type":"vm"'* ]]
}
