#!/usr/bin/env bats
# vmbk-rotate at the end of the real cron pipe (examples/cron), on a real
# libvirt domain whose name is hostile (spaces, quotes, unicode, dots).

load helpers

setup() {
  DIR=$(vm_tmpdir)
  NAME="bats rot 'q' \"dq\" ü ..$$"
  define_domain "$NAME" "$DIR"
  BACKUPS="$BATS_TEST_TMPDIR/backups"
  mkdir -p "$BACKUPS"
  printf 'backup_path = "%s"\npolicy = "daily"\n[retention]\ndaily = 2\n' "$BACKUPS" > "$VMBK_CONFIG_DIR/default.toml"
}

teardown() {
  undefine_domain "$NAME"
  rm -rf "$DIR"
}

# One night of the cron line, for this VM only, at $1.
night() {
  touch -d "@$(( $(date +%s) + 5 ))" "$DIR/disk.qcow2"  # the shut-off VM's disk changed: a copy each night
  bash -c 'set -o pipefail; vmbk-discover --vm "$1" | vmbk-plan --now "$2" | vmbk-backup --now "$2" | vmbk-rotate --now "$2"' \
    _ "$NAME" "$1"
}

@test "the cron pipe with rotate: backup records passed on, the oldest period removed on the third night" {
  grep -q '^30 1 .*vmbk-backup | vmbk-rotate | vmbk-replicate' "$ROOT/examples/cron"
  grep -q "ExecStart=.*vmbk-backup | vmbk-rotate | vmbk-replicate" "$ROOT/examples/vmbk-backup.service"
  night 2026-11-16T01:30:00Z > "$BATS_TEST_TMPDIR/1.jsonl"
  night 2026-11-17T01:30:00Z > "$BATS_TEST_TMPDIR/2.jsonl"
  run --separate-stderr night 2026-11-18T01:30:00Z
  [ "$status" -eq 0 ]
  [ "$(jq -s -c 'map(.type)' <<<"$output")" = '["backup","rotate"]' ]
  [ "$(jq -r 'select(.type=="backup") | .outcome' <<<"$output")" = ok ]
  rot=$(jq -c 'select(.type=="rotate")' <<<"$output")
  [ "$(jq -r .name <<<"$rot")" = "$NAME" ]
  [ "$(jq -r .policy <<<"$rot")" = daily ]
  [ "$(jq -r .keep <<<"$rot")" = 2 ]
  [ "$(jq -r '.removed | length' <<<"$rot")" = 1 ]
  [ "$(jq -r '.removed[0].path' <<<"$rot")" = "$BACKUPS/$NAME/20261116" ]
  [ "$(jq -r '.removed[0].tier' <<<"$rot")" = count ]
  [ "$(jq -r '.freed_bytes > 0' <<<"$rot")" = true ]
  [ "$(jq -r '[.kept[].path] | join(",")' <<<"$rot")" = "$BACKUPS/$NAME/20261117,$BACKUPS/$NAME/20261118" ]
  [ "$(jq -r .dry_run <<<"$rot")" = false ]
  [ "$(jq -r .session <<<"$rot")" = "$(jq -r 'select(.type=="backup") | .session' <<<"$output")" ]
  [ "$(jq -c 'select(.type=="rotate") | .removed | length' "$BATS_TEST_TMPDIR/1.jsonl" "$BATS_TEST_TMPDIR/2.jsonl" | tr '\n' ,)" = '0,0,' ]
  [ "$(ls "$BACKUPS/$NAME")" = "$(printf '20261117\n20261118')" ]
}

@test "on a terminal: a table; --prune in a pipe without --yes refuses (exit 7)" {
  night 2026-11-16T01:30:00Z > /dev/null
  night 2026-11-17T01:30:00Z > /dev/null
  night 2026-11-18T01:30:00Z > /dev/null
  export VMNAME="$NAME"  # through the environment: the name has quotes
  run script -qec 'vmbk-rotate --vm "$VMNAME" --now 2026-11-19T01:30:00Z --dry-run' /dev/null
  [ "$status" -eq 0 ]
  [[ "$output" == *NAME*POLICY*KEEP*KEPT*REMOVED*PROTECTED*FREED_BYTES* ]]
  [[ "$output" == *"$NAME"*daily* ]]
  [[ "$output" != *"{"* ]]
  run script -qec 'vmbk-rotate --prune list --vm "$VMNAME"' /dev/null
  [ "$status" -eq 0 ]
  [[ "$output" == *TARGET*COMMAND* ]]
  [[ "$output" == *"period:20261117"* ]]
  run --separate-stderr bash -c 'echo | vmbk-rotate --prune period:20261117 --vm "$1"' _ "$NAME"
  [ "$status" -eq 7 ]
  [ -z "$output" ]
  [[ "$stderr" == *"--yes"* ]]
  [ -d "$BACKUPS/$NAME/20261117" ]
  run --separate-stderr vmbk-rotate --prune period:20261117 --vm "$NAME" --yes --json
  [ "$status" -eq 0 ]
  [ "$(jq -r '.removed[0].tier' <<<"$output")" = prune ]
  [ ! -e "$BACKUPS/$NAME/20261117" ]
}
