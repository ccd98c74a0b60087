#!/usr/bin/env python3
"""Creates the AWS fixtures Pacer's tests and demo use, through boto3 against AWS_ENDPOINT_URL,
and prints them as shell assignments (FIXTURE_*=id)."""

import json
import os

import boto3

REGION = "us-east-1"
endpoint = os.environ["AWS_ENDPOINT_URL"]
session = boto3.session.Session(aws_access_key_id="testing", aws_secret_access_key="testing", region_name=REGION)
ec2 = session.client("ec2", endpoint_url=endpoint)
iam = session.client("iam", endpoint_url=endpoint)


def tags(name):
    return [{"ResourceType": "vpc", "Tags": [{"Key": "Name", "Value": name}]}]


def vpc(cidr, name):
    vpc_id = ec2.create_vpc(CidrBlock=cidr, TagSpecifications=tags(name))["Vpc"]["VpcId"]
    return vpc_id


def subnet(vpc_id, cidr, zone):
    return ec2.create_subnet(VpcId=vpc_id, CidrBlock=cidr, AvailabilityZone=zone)["Subnet"]["SubnetId"]


def security_group(vpc_id, name):
    return ec2.create_security_group(GroupName=name, Description="Pacer runners (test fixture)", VpcId=vpc_id)["GroupId"]


out = {}
out["VPC"] = vpc("10.40.0.0/16", "pacer-test")
# Wide enough for thousands of instances in one test ground: moto does not give a terminated
# instance's address back, and a /24 ran out after 251 launches in a 200-job chaos run.
out["SUBNET_A"] = subnet(out["VPC"], "10.40.16.0/20", REGION + "a")
out["SUBNET_B"] = subnet(out["VPC"], "10.40.32.0/20", REGION + "b")
out["SECURITY_GROUP"] = security_group(out["VPC"], "pacer-runners")
# A second VPC, for pools that wrongly mix networks.
out["OTHER_VPC"] = vpc("10.41.0.0/16", "pacer-test-other")
out["OTHER_SUBNET"] = subnet(out["OTHER_VPC"], "10.41.1.0/24", REGION + "a")
out["OTHER_SECURITY_GROUP"] = security_group(out["OTHER_VPC"], "pacer-runners-other")

trust = {"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]}
iam.create_role(RoleName="pacer-runner", AssumeRolePolicyDocument=json.dumps(trust))
iam.create_instance_profile(InstanceProfileName="pacer-runner")
iam.add_role_to_instance_profile(InstanceProfileName="pacer-runner", RoleName="pacer-runner")
out["INSTANCE_PROFILE"] = "pacer-runner"
# An instance profile without a role, which cannot launch anything.
iam.create_instance_profile(InstanceProfileName="pacer-empty")
out["EMPTY_INSTANCE_PROFILE"] = "pacer-empty"

images = ec2.describe_images(Owners=["099720109477"])["Images"]
for image in images:
    key = "AMI_ARM64" if image["Architecture"] == "arm64" else "AMI_X86_64"
    out[key] = image["ImageId"]

for key, value in out.items():
    print("FIXTURE_%s=%s" % (key, value))
