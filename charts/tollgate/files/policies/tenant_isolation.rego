# Tenant isolation: a call may only touch the tenant its run acts for.
# Config (data.tollgate_config): tenant_fields (body fields naming a tenant),
# stripe_accounts ({tenant: [acct_...]}).
package tollgate

import rego.v1

tenant_fields := object.get(data.tollgate_config, "tenant_fields", ["tenant", "tenant_id", "customer_tenant", "org_id"])

deny contains msg if {
	some field in tenant_fields
	value := input.request.body[field]
	is_string(value)
	value != input.tenant.id
	msg := sprintf("body field %v names tenant %v but this run acts for tenant %v; a run may only touch its own tenant", [field, value, input.tenant.id])
}

deny contains msg if {
	acct := input.request.headers["stripe-account"]
	allowed := object.get(object.get(data.tollgate_config, "stripe_accounts", {}), input.tenant.id, [])
	not acct in allowed
	msg := sprintf("Stripe-Account %v does not belong to tenant %v", [acct, input.tenant.id])
}
