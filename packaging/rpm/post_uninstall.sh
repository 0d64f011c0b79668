# hms-edge %postun ($1: 0 = erase, 1 = upgrade). Upgrade: restart the running services with the
# new binaries. Erase keeps the store, the keys and the users; it deletes the store, the agent
# state and the master key only when confirmed with HMS_EDGE_PURGE_DATA=yes or the flag file
# /etc/hms-edge/PURGE-DATA (README, Operations).
if [ -d /run/systemd/system ]; then
	systemctl daemon-reload >/dev/null 2>&1 || :
	if [ "$1" -ge 1 ]; then
		systemctl try-restart hms-edged.service hms-edge-agent.service >/dev/null 2>&1 || :
	fi
fi
if [ "$1" -eq 0 ]; then
	rm -f /etc/systemd/system/hms-edged.service.d/50-master-key-file.conf
	rmdir /etc/systemd/system/hms-edged.service.d 2>/dev/null || :
	if [ "${HMS_EDGE_PURGE_DATA:-}" = "yes" ] || [ -e /etc/hms-edge/PURGE-DATA ]; then
		rm -rf /var/lib/hms-edge /var/lib/hms-edge-agent /run/hms-edge /etc/hms-edge/credstore.encrypted
		rm -f /etc/hms-edge/master-key /etc/hms-edge/PURGE-DATA
		rmdir /etc/hms-edge 2>/dev/null || :
		echo "hms-edge: deleted the store, the agent state and the master key (confirmed)"
	else
		echo "hms-edge: kept the store /var/lib/hms-edge and the master key in /etc/hms-edge"
		echo "hms-edge: (to delete them: rm -rf /var/lib/hms-edge /var/lib/hms-edge-agent /etc/hms-edge)"
	fi
fi
exit 0
