package tollgate_test

import rego.v1

deploy_at(weekday, hour, minute) := {"tenant": {"id": "acme_co"}, "tool": {"name": "deploy.release", "risk": {"financial": false, "reversible": true}, "labels": {"tollgate.dev/kind": "deploy"}}, "request": {"method": "POST", "path": "/", "headers": {}, "query": {}, "body": {}}, "agent": {"name": "a", "labels": {}}, "time": {"weekday": weekday, "hour": hour, "minute": minute}}

windows := {"change_windows": [{"days": ["Monday", "Tuesday"], "start": "09:00", "end": "17:30"}]}

test_inside_window if {
	count(data.tollgate.deny) == 0 with input as deploy_at("Tuesday", 17, 29) with data.tollgate_config as windows
}

test_after_window if {
	count(data.tollgate.deny) == 1 with input as deploy_at("Tuesday", 17, 30) with data.tollgate_config as windows
}

test_wrong_day if {
	count(data.tollgate.deny) == 1 with input as deploy_at("Sunday", 12, 0) with data.tollgate_config as windows
}

test_no_windows_means_no_deploys if {
	count(data.tollgate.deny) == 1 with input as deploy_at("Tuesday", 12, 0)
}
