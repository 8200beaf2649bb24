package tollgate_test

import rego.v1

call_with(path, body) := {"tenant": {"id": "acme_co"}, "tool": {"name": "admin.api", "risk": {"financial": false, "reversible": true}, "labels": {}}, "request": {"method": "POST", "path": path, "headers": {}, "query": {}, "body": body}, "agent": {"name": "a", "labels": {}}}

test_on_behalf_of_denied if {
	count(data.tollgate.deny) == 1 with input as call_with("/v1/tickets", {"on_behalf_of": "ceo@acme.example"})
}

test_switch_endpoint_denied if {
	count(data.tollgate.deny) == 1 with input as call_with("/v1/session/switch-account", {})
}

test_ordinary_call_allowed if {
	count(data.tollgate.deny) == 0 with input as call_with("/v1/tickets", {"subject": "hi"})
}
