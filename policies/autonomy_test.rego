package tollgate_test

import rego.v1

as_stage(stage, method) := {"tenant": {"id": "acme_co"}, "tool": {"name": "crm.update", "risk": {"financial": false, "reversible": true}, "labels": {}}, "request": {"method": method, "path": "/", "headers": {}, "query": {}, "body": {}}, "agent": {"name": "a", "labels": {"tollgate.dev/autonomy": stage}}}

test_observe_denies_writes if {
	count(data.tollgate.deny) == 1 with input as as_stage("observe", "PATCH")
}

test_observe_allows_reads if {
	count(data.tollgate.deny) == 0 with input as as_stage("observe", "GET")
}

test_approve_writes_holds_writes if {
	count(data.tollgate.require_approval) == 1 with input as as_stage("approve-writes", "POST")
}

test_autonomous_adds_nothing if {
	count(data.tollgate.require_approval) == 0 with input as as_stage("autonomous-under-thresholds", "POST")
	count(data.tollgate.deny) == 0 with input as as_stage("autonomous-under-thresholds", "POST")
}

test_unknown_stage_fails_closed if {
	count(data.tollgate.deny) == 1 with input as as_stage("yolo", "GET")
}
