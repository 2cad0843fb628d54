# Shell helpers shared by scripts/bootstrap.sh and scripts/bench-peers.sh (sourced, not run).
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
# apt_install PREFIX PACKAGE...: installs Debian packages quietly, saying which.
apt_install() {
  local who=$1; shift
  echo "$who: installing $* with apt" >&2
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@" >/dev/null
}
