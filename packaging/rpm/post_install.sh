# hms-edge %post ($1: 1 = install, 2 = upgrade). Users, folders, master key (first install
# only), then enable and start the units when systemd runs (like the .deb). Never fails.
/usr/lib/hms-edge/package-setup configure || echo "hms-edge: set-up failed; see above" >&2
if [ -d /run/systemd/system ]; then
	systemctl daemon-reload >/dev/null 2>&1 || :
	if [ "$1" -eq 1 ]; then
		systemctl enable --now hms-edged.service hms-edge-agent.service >/dev/null 2>&1 || :
	fi
fi
exit 0
