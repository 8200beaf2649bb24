# Deploy tools run only inside configured change windows (UTC).
# Config: deploy_tools (names), change_windows: [{days: [Monday, ...], start: "HH:MM", end: "HH:MM"}].
# A tool labelled tollgate.dev/kind=deploy is a deploy tool too.
package tollgate

import rego.v1

cw_is_deploy if input.tool.name in object.get(data.tollgate_config, "deploy_tools", [])

cw_is_deploy if input.tool.labels["tollgate.dev/kind"] == "deploy"

# "09:30" -> 570. Prefixing "1" keeps leading zeros parseable ("109" - 100 = 9).
cw_minutes(hhmm) := ((to_number(concat("", ["1", parts[0]])) - 100) * 60) + (to_number(concat("", ["1", parts[1]])) - 100) if {
	parts := split(hhmm, ":")
	count(parts) == 2
}

cw_now := (input.time.hour * 60) + input.time.minute

cw_in_window if {
	some w in object.get(data.tollgate_config, "change_windows", [])
	input.time.weekday in w.days
	cw_now >= cw_minutes(w.start)
	cw_now < cw_minutes(w.end)
}

deny contains msg if {
	cw_is_deploy
	not cw_in_window
	msg := sprintf("%v is outside the configured change windows (now %v %v:%v UTC); wait for a window or ask for an exception", [input.tool.name, input.time.weekday, input.time.hour, input.time.minute])
}
