package tollgate_test

import rego.v1

base := {"tenant": {"id": "acme_co"}, "tool": {"name": "t", "risk": {"financial": false, "reversible": true}, "labels": {}}, "request": {"method": "GET", "path": "/", "headers": {}, "query": {}, "body": {}}, "agent": {"name": "a", "labels": {}}}

test_foreign_tenant_in_body_denied if {
	count(data.tollgate.deny) == 1 with input as object.union(base, {"request": {"method": "POST", "path": "/", "headers": {}, "query": {}, "body": {"tenant_id": "globex"}}})
}

test_own_tenant_in_body_allowed if {
	count(data.tollgate.deny) == 0 with input as object.union(base, {"request": {"method": "GET", "path": "/", "headers": {}, "query": {}, "body": {"tenant_id": "acme_co"}}})
}

test_stripe_account_checked if {
	denied := data.tollgate.deny with input as object.union(base, {"request": {"method": "GET", "path": "/", "headers": {"stripe-account": "acct_x"}, "query": {}, "body": {}}})
		with data.tollgate_config as {"stripe_accounts": {"acme_co": ["acct_acme"]}}
	count(denied) == 1
}
