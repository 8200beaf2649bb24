package tollgate_test

import rego.v1

tool_call(risk) := {"tenant": {"id": "acme_co"}, "tool": {"name": "github.delete_repo", "risk": risk, "labels": {}}, "request": {"method": "DELETE", "path": "/", "headers": {}, "query": {}, "body": {}}, "agent": {"name": "a", "labels": {}}}

test_irreversible_needs_approval if {
	count(data.tollgate.require_approval) == 1 with input as tool_call({"reversible": false, "financial": false})
}

test_reversible_does_not if {
	count(data.tollgate.require_approval) == 0 with input as tool_call({"reversible": true, "financial": false})
}
