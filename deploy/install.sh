#!/usr/bin/env bash
# Install (or upgrade) factoryd on a station PC from this source tree. Idempotent: run it again
# after `git pull` to upgrade; it never overwrites the config, the CA passphrase or udev rules.
#
#   sudo deploy/install.sh                 install, enable (not start) factoryd.service
#   deploy/install.sh --dry-run            print what it would do, change nothing
#   deploy/install.sh --prefix /tmp/root   install the files under /tmp/root, without root:
#                                          user creation, chown, udevadm and systemctl are printed
#                                          instead of run (tests, image builds)
#
# What it does (docs/operators-guide.md, "Installing a station"):
#   user/group factoryd (system account, member of dialout)
#   /opt/factoryd/venv             factoryd and its dependencies (pip install of this tree)
#   /opt/factoryd/docs             the guides
#   /etc/factoryd/factoryd.toml    from config/factoryd.toml, only if absent (0644: no secrets in it)
#   /etc/factoryd/ca-passphrase    generated if absent (0600 root:root): back it up offline
#   /var/lib/factoryd              state directory (0700 factoryd:factoryd)
#   /etc/udev/rules.d/             deploy/udev/*.rules, only those not yet installed
#   /etc/systemd/system/           factoryd.service, plus the drop-ins the config needs
#   /usr/local/bin/factoryd        link to the venv's factoryd (operators: ports, status)
#   /usr/local/sbin/factoryd-admin runs factoryd commands as user factoryd with the passphrase
set -euo pipefail

SERVICE_USER=factoryd
SERVICE_GROUP=factoryd
# 32 random bytes, base64: 256 bits for the scrypt/PBKDF-protected CA keys at rest.
PASSPHRASE_BYTES=32

src=$(cd "$(dirname "$0")/.." && pwd)
prefix=""
dry_run=0
skip_venv=0
enable=1
python=${PYTHON:-python3}

usage() {
    cat <<EOF
usage: $0 [--dry-run] [--prefix DIR] [--source DIR] [--python PYTHON] [--skip-venv] [--no-enable]
  --dry-run      print every action, change nothing
  --prefix DIR   install under DIR; privileged steps (useradd, chown, udevadm, systemctl) are printed
  --source DIR   factoryd source tree (default: $src)
  --python PY    interpreter for the venv (default: python3, needs >= 3.11)
  --skip-venv    do not create/upgrade /opt/factoryd/venv (it is managed elsewhere)
  --no-enable    install the unit but do not enable it
EOF
}

while [ $# -gt 0 ]; do
    case $1 in
        --dry-run) dry_run=1 ;;
        --prefix) prefix=${2:?--prefix needs a directory}; shift ;;
        --prefix=*) prefix=${1#--prefix=} ;;
        --source) src=${2:?--source needs a directory}; shift ;;
        --source=*) src=${1#--source=} ;;
        --python) python=${2:?--python needs an interpreter}; shift ;;
        --python=*) python=${1#--python=} ;;
        --skip-venv) skip_venv=1 ;;
        --no-enable) enable=0 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "install.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

if [ -n "$prefix" ]; then
    prefix=$(realpath -m "$prefix")
fi
for f in systemd/factoryd.service config/factoryd.toml pyproject.toml; do
    [ -f "$src/$f" ] || { echo "install.sh: $src is not a factoryd source tree (no $f)" >&2; exit 2; }
done
if [ -z "$prefix" ] && [ "$dry_run" -eq 0 ] && [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: run as root (sudo), or use --prefix DIR / --dry-run" >&2
    exit 1
fi

opt=$prefix/opt/factoryd
venv=$opt/venv
etc=$prefix/etc/factoryd
state=$prefix/var/lib/factoryd
units=$prefix/etc/systemd/system
dropins=$units/factoryd.service.d
udev_rules=$prefix/etc/udev/rules.d
sbin=$prefix/usr/local/sbin
bin=$prefix/usr/local/bin

say() { printf '==> %s\n' "$*"; }

# Run a command that only touches files under the prefix.
run() {
    printf '+ %s\n' "$*"
    [ "$dry_run" -eq 1 ] || "$@"
}

# Run a command that needs root and the real system: printed only with --prefix or --dry-run.
priv() {
    if [ -n "$prefix" ] || [ "$dry_run" -eq 1 ]; then
        printf '+ (skipped: %s) %s\n' "$([ -n "$prefix" ] && echo prefix mode || echo dry run)" "$*"
        return 0
    fi
    printf '+ %s\n' "$*"
    "$@"
}

# Install a file with a mode; owner:group only on the real system.
put() {
    local mode=$1 owner=$2 from=$3 to=$4
    run install -m "$mode" "$from" "$to"
    priv chown "$owner" "$to"
}

# 1. Service account ------------------------------------------------------------------------------
say "service account $SERVICE_USER (groups: $SERVICE_GROUP, dialout)"
if [ -n "$prefix" ] || [ "$dry_run" -eq 1 ] || ! getent group "$SERVICE_GROUP" >/dev/null; then
    priv groupadd --system "$SERVICE_GROUP"
fi
if [ -n "$prefix" ] || [ "$dry_run" -eq 1 ] || ! getent passwd "$SERVICE_USER" >/dev/null; then
    priv useradd --system --gid "$SERVICE_GROUP" --groups dialout --home-dir /var/lib/factoryd \
        --no-create-home --shell /usr/sbin/nologin --comment "factoryd provisioning station" "$SERVICE_USER"
fi
# Also for an account that existed before (idempotent).
priv usermod --append --groups dialout "$SERVICE_USER"

# 2. Program ----------------------------------------------------------------------------------------
say "program in $venv"
run mkdir -p "$opt"
if [ "$skip_venv" -eq 1 ]; then
    echo "    --skip-venv: leaving $venv as it is"
else
    if [ ! -x "$venv/bin/python" ]; then
        run "$python" -m venv "$venv"
    fi
    run "$venv/bin/python" -m pip install --quiet --upgrade pip
    # Not editable: the station runs a snapshot of this tree. "udev": pyudev for udev events.
    run "$venv/bin/python" -m pip install --quiet --upgrade "${src}[udev]"
fi
run mkdir -p "$opt/docs"
for doc in "$src"/docs/*.md; do
    [ -e "$doc" ] || continue
    run install -m 0644 "$doc" "$opt/docs/"
done

# 3. Configuration ----------------------------------------------------------------------------------
say "configuration in $etc"
# World-readable: operators' `factoryd ports …` reads [api] from it. Secrets live in root-only files.
run install -d -m 0755 "$etc"
priv chown root:root "$etc"
if [ -e "$etc/factoryd.toml" ]; then
    echo "    keeping the existing $etc/factoryd.toml (compare with $src/config/factoryd.toml)"
else
    put 0644 root:root "$src/config/factoryd.toml" "$etc/factoryd.toml"
    echo "    NOTE: edit $etc/factoryd.toml ([station], [hub]) before starting factoryd"
fi

# 4. CA passphrase ----------------------------------------------------------------------------------
passphrase=$etc/ca-passphrase
if [ -e "$passphrase" ]; then
    say "CA passphrase: keeping $passphrase"
    run chmod 0600 "$passphrase"
    priv chown root:root "$passphrase"
elif [ -n "$(ls -A "$state/bundles" 2>/dev/null)" ]; then
    # A new passphrase would not open the CA keys already stored: never paper over a lost file.
    echo "install.sh: $passphrase is missing but $state/bundles holds CA bundles encrypted with it;" >&2
    echo "            restore the passphrase from its backup, then run install.sh again" >&2
    exit 1
else
    say "CA passphrase: generating $passphrase"
    if [ "$dry_run" -eq 1 ]; then
        echo "+ (dry run) write $PASSPHRASE_BYTES random bytes, base64, to $passphrase (0600)"
    else
        (umask 077 && head -c "$PASSPHRASE_BYTES" /dev/urandom | base64 | tr -d '\n' >"$passphrase")
        chmod 0600 "$passphrase"
    fi
    priv chown root:root "$passphrase"
    cat <<EOF
    ******************************************************************************************
    A new CA passphrase was generated in $passphrase (root only, 0600).
    It encrypts every customer CA key this station stores. BACK IT UP OFFLINE NOW (e.g. in the
    customer's or the plant's password safe): without it the stored CA bundles cannot be
    opened, and a station rebuilt from backups cannot provision or sign manifests.
    systemd hands it to factoryd as credential factoryd-ca-passphrase (LoadCredential=).
    ******************************************************************************************
EOF
fi

# 5. State directory --------------------------------------------------------------------------------
say "state directory $state"
run install -d -m 0700 "$state"
priv chown "$SERVICE_USER:$SERVICE_GROUP" "$state"

# 6. udev rules ---------------------------------------------------------------------------------
udev_changed=0
for rules in "$src"/deploy/udev/*.rules; do
    [ -e "$rules" ] || continue
    target=$udev_rules/$(basename "$rules")
    if [ -e "$target" ]; then
        say "udev: keeping $target (compare with $rules)"
        continue
    fi
    say "udev: installing $target (a template: edit the hub location and ID_PATHs)"
    run mkdir -p "$udev_rules"
    run install -m 0644 "$rules" "$target"
    udev_changed=1
done
if [ "$udev_changed" -eq 1 ]; then
    priv udevadm control --reload
    priv udevadm trigger --subsystem-match=usb --subsystem-match=tty
fi

# 7. systemd unit and drop-ins ------------------------------------------------------------------
say "systemd unit in $units"
run mkdir -p "$units"
run install -m 0644 "$src/systemd/factoryd.service" "$units/factoryd.service"
backend=sim
config_file=$etc/factoryd.toml
[ -e "$config_file" ] || config_file=$src/config/factoryd.toml
if backend=$("$python" -c 'import sys, tomllib
with open(sys.argv[1], "rb") as fh:
    print(tomllib.load(fh).get("hub", {}).get("backend", "sim"))' "$config_file" 2>/dev/null); then
    :
else
    echo "install.sh: cannot read hub.backend from $config_file; assuming sim" >&2
    backend=sim
fi
wanted=()
case $backend in
    sysfs) wanted+=(hub-sysfs.conf) ;;
    uhubctl) wanted+=(hub-uhubctl.conf) ;;
    ykush) wanted+=(hub-ykush.conf) ;;
    brainstem) wanted+=(hub-brainstem.conf) ;;
esac
[ -e "$etc/mqtt-password" ] && wanted+=(mqtt-password.conf)
echo "    hub backend $backend; drop-ins: ${wanted[*]:-none}"
run mkdir -p "$dropins"
for dropin in "$src"/systemd/drop-ins/*.conf; do
    [ -e "$dropin" ] || continue
    name=$(basename "$dropin")
    if [[ " ${wanted[*]:-} " == *" $name "* ]]; then
        run install -m 0644 "$dropin" "$dropins/$name"
    elif [ -e "$dropins/$name" ]; then
        run rm -f "$dropins/$name"
    fi
done

# 8. Commands ----------------------------------------------------------------------------------
say "command $bin/factoryd"
run mkdir -p "$bin"
run ln -sfn /opt/factoryd/venv/bin/factoryd "$bin/factoryd"

# Admin wrapper ------------------------------------------------------------------------------
say "admin wrapper $sbin/factoryd-admin"
run mkdir -p "$sbin"
write_wrapper() {
    cat <<'EOF'
#!/bin/sh
# factoryd-admin: run a factoryd command as the service user, with the CA passphrase handed over
# the way systemd does it ($CREDENTIALS_DIRECTORY), so files it creates in /var/lib/factoryd stay
# readable by the service and the passphrase never appears in a command line or environment.
#   sudo factoryd-admin lots list
#   sudo factoryd-admin lots bundle acme-2026-11 /srv/upload/acme-ca.p12
# Installed by deploy/install.sh. Config: $FACTORYD_CONFIG or /etc/factoryd/factoryd.toml.
set -eu
[ "$(id -u)" -eq 0 ] || { echo "factoryd-admin: run it with sudo" >&2; exit 1; }
creds=$(mktemp -d /run/factoryd-admin.XXXXXX)
trap 'rm -rf "$creds"' EXIT INT TERM
install -m 0400 -o factoryd -g factoryd /etc/factoryd/ca-passphrase "$creds/factoryd-ca-passphrase"
if [ -e /etc/factoryd/mqtt-password ]; then
    install -m 0400 -o factoryd -g factoryd /etc/factoryd/mqtt-password "$creds/factoryd-mqtt-password"
fi
chown factoryd:factoryd "$creds"
chmod 0500 "$creds"
cd /var/lib/factoryd
status=0
runuser -u factoryd -- env CREDENTIALS_DIRECTORY="$creds" \
    FACTORYD_CONFIG="${FACTORYD_CONFIG:-/etc/factoryd/factoryd.toml}" \
    /opt/factoryd/venv/bin/factoryd "$@" || status=$?
exit "$status"
EOF
}
if [ "$dry_run" -eq 1 ]; then
    echo "+ (dry run) write $sbin/factoryd-admin (0755)"
else
    echo "+ write $sbin/factoryd-admin (0755)"
    write_wrapper >"$sbin/factoryd-admin.new"
    chmod 0755 "$sbin/factoryd-admin.new"
    mv -f "$sbin/factoryd-admin.new" "$sbin/factoryd-admin"
fi

# 9. Enable -------------------------------------------------------------------------------------
priv systemctl daemon-reload
if [ "$enable" -eq 1 ]; then
    priv systemctl enable factoryd.service
fi

say "done"
cat <<EOF
Next steps (docs/operators-guide.md):
  1. edit /etc/factoryd/factoryd.toml ([station] name and line, [hub]); udev rules in /etc/udev/rules.d/
  2. sudo deploy/install.sh again if you changed [hub] backend (it picks the unit's drop-ins)
  3. sudo factoryd-admin lots create … / lots import … / lots bundle … / lots activate …
  4. sudo systemctl start factoryd && journalctl -u factoryd -f
EOF
